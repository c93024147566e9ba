"""The C++ extensions' names in torch's cache: keyed by what the compiler targets and by the source."""

from __future__ import annotations

import pytest

from model.kernels import cpp_build, cpu_mxfp4, token_bitmask


def test_builds_are_keyed_by_what_they_target() -> None:
    """The name carries the compiler's target macros: flags (or a CPU) that change the code built change the
    name, so a shared extensions cache never hands one CPU's build to another."""
    native = cpp_build.target_key(cpu_mxfp4.FLAGS)
    assert native == cpp_build.target_key(cpu_mxfp4.FLAGS)
    assert native != cpp_build.target_key(("-O3", "-march=x86-64", "-fopenmp"))
    assert native != cpp_build.target_key(("-O3", "-march=x86-64-v3", "-fopenmp"))


def test_builds_are_keyed_by_their_source() -> None:
    """Two versions of a kernel's source get two names: checkouts sharing torch's extension cache keep their
    own builds instead of rebuilding one directory in turn."""
    source = cpu_mxfp4._source()
    name = cpp_build.build_name("gpt_oss_cpu_mxfp4", source, cpu_mxfp4.FLAGS)
    assert name == cpp_build.build_name("gpt_oss_cpu_mxfp4", source, cpu_mxfp4.FLAGS)
    assert name != cpp_build.build_name(
        "gpt_oss_cpu_mxfp4", source + "\n// another version\n", cpu_mxfp4.FLAGS
    )
    assert name.startswith("gpt_oss_cpu_mxfp4_" + cpp_build.target_key(cpu_mxfp4.FLAGS))


def test_both_extensions_are_built_under_such_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each module hands load_inline the name :func:`cpp_build.build_name` gives its own source."""
    from torch.utils import cpp_extension

    names = []
    monkeypatch.setattr(cpp_extension, "load_inline", lambda name, cpp_sources, **_: names.append(name))
    for module, stem in ((cpu_mxfp4, "gpt_oss_cpu_mxfp4"), (token_bitmask, "gpt_oss_token_bitmask")):
        module._build()
        source = cpu_mxfp4._source() if module is cpu_mxfp4 else token_bitmask._SOURCE.read_text()
        assert names[-1] == cpp_build.build_name(stem, source, module.FLAGS)
