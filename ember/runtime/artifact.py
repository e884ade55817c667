"""Names and hashing shared by the artifact writer (compiler side) and the loader (runtime side)."""

import hashlib

LIB = "model.so"
PARAMS = "params.bin"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
