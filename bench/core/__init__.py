"""The leaves: errors, atomic writes and the one file lock, an ImageFolder's file listing,
content hashes and identity, defaults and the one cache root, the network's time limit, image
decoding, dtypes, statistics, ``KEY=VALUE`` parsing, the one ``Registry`` type, how a setting is
declared and the one cancellation flag.

Nothing here imports from another layer of ppt-bench.
"""
