"""The built-in `browser` tool: search, open and find, shown as the gpt-oss models were trained to read.

* `page`: HTML and text to numbered 80-column lines with link ids, and the token-budgeted view;
* `backends`: the `SearchBackend` and `PageFetcher` seams and their plain data;
* `local_corpus`: an offline corpus of files (the default, and the tests' backend);
* `searxng`: web search through a SearXNG instance;
* `fetch`: direct HTTP fetching behind an SSRF guard;
* `browser`: one response chain's state (cursors, pages, the open budget) and its citations.

Nothing is imported here: each user takes the modules it needs (the fetcher pulls in httpx, the pages lxml).
"""
