"""The model store: ``url`` files and Hugging Face repos made present in the model dir before an engine starts.

``download.py`` fetches ``url`` files, ``hub.py`` snapshots repos; both rest on small modules that each hold one
concern, so that either downloader reads as the order of its steps: ``errors.py`` (the one error and its flags),
``retry.py`` (what is retried, for how long), ``locking.py`` (one download per file across processes),
``checksums.py`` (sha256 and its cache), ``progress.py`` (when to report, in which words), ``files.py`` (writes that
survive a crash). ``bars.py`` draws the progress of ``mistral-gateway pull`` (the only one that imports rich).
Nothing is imported here: the gateway reads GGUF headers and tokenizers from this package at every start, and the
downloaders' libraries (httpx, tenacity, filelock) are loaded only when a download runs.
"""
