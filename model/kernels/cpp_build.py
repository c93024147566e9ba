"""Names of the project's C++ extensions in torch's extension cache (:mod:`model.kernels.cpu_mxfp4`,
:mod:`model.kernels.token_bitmask`).

torch caches an extension built by ``load_inline`` by its name, in one directory per machine (or per mounted
home), so the name must change whenever the build would: :func:`build_name` joins a stem, a digest of what
the compiler flags target on this machine (:func:`target_key`) and a digest of the source.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess


@functools.cache
def target_key(flags: tuple[str, ...]) -> str:
    """A digest of what `flags` make the compiler target on this machine: its predefined macros (``__AVX2__``,
    ``__AVX512BF16__``, ...), which decide the code built. -march=native builds for this CPU only, so a cache
    shared by machines with other CPUs (a mounted home, a copied image) then holds one build per CPU, never
    one CPU's build loaded on another (where it would die of an illegal instruction)."""
    done = subprocess.run(
        ["c++", *flags, "-dM", "-E", "-x", "c++", "-"], input="", capture_output=True, text=True, check=True
    )
    macros = sorted(line for line in done.stdout.splitlines() if "__" in line)
    return hashlib.sha256("\n".join([*flags, *macros]).encode()).hexdigest()[:16]


def build_name(stem: str, source: str, flags: tuple[str, ...]) -> str:
    """The extension's name in torch's cache: `stem`, the CPU target's digest and the source's. With the
    source in the name, checkouts of different versions sharing one cache (two worktrees, an upgrade beside an
    older install) each keep their own build, instead of rebuilding one directory in turn, racing when they
    run at once."""
    return f"{stem}_{target_key(flags)}_{hashlib.sha256(source.encode()).hexdigest()[:12]}"
