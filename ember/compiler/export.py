"""Artifact writing.

An artifact is a directory (or a .tar of one) holding:

    model.so        host + device code (the Relax VM executable and every kernel)
    params.bin      the weights, already transformed for the kernels (tvm.runtime.save_param_dict format)
    manifest.json   format version, ember/TVM versions, target, input/output specs, compression, sha256 of files

Writing goes to a temporary sibling first and is renamed into place, so a crash never leaves half an artifact
under the user's name, and an existing path is replaced only when the caller says ``overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile

import numpy as np

from ..errors import ArtifactError
from ..runtime.artifact import LIB, MANIFEST, PARAMS, sha256_file


def _write_dir(model, out_dir: str):
    import tvm

    src = getattr(model, "_artifact_source", None)
    ex = getattr(model, "_executable", None)
    manifest = dict(model.manifest)
    if ex is not None:
        # Linked for the target's machine (cross compilers for aarch64 / macOS), then its device code checked.
        from ..compiler.cross import export_library

        manifest["target"] = export_library(ex, os.path.join(out_dir, LIB), manifest.get("target", {}))
    elif src is not None:
        shutil.copy2(os.path.join(src, LIB), os.path.join(out_dir, LIB))
    else:
        raise ArtifactError("this model has neither an executable nor a source artifact to export")
    params = model._params if model._params is not None else model._raw_params
    names = [f"p{i}" for i in range(len(params))]
    tensors = {n: tvm.runtime.tensor(p) if isinstance(p, np.ndarray) else p for n, p in zip(names, params)}
    tvm.runtime.save_param_dict_to_file(tensors, os.path.join(out_dir, PARAMS))
    manifest["params"] = {"file": PARAMS, "names": names, "count": len(names),
                          "bytes": int(sum(_nbytes(p) for p in params))}
    manifest["files"] = {f: {"sha256": sha256_file(os.path.join(out_dir, f)),
                             "bytes": os.path.getsize(os.path.join(out_dir, f))} for f in (LIB, PARAMS)}
    with open(os.path.join(out_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")


def _nbytes(t) -> int:
    return int(np.prod(t.shape)) * np.dtype(str(t.dtype)).itemsize


def _refuse_existing(path: str, overwrite: bool):
    if os.path.lexists(path) and not overwrite:
        raise ArtifactError(f"{path} already exists; choose another path or pass overwrite=True (--force on the "
                            "command line) to replace it")
    if os.path.isdir(path) and not os.path.islink(path) and os.listdir(path):
        if not os.path.isfile(os.path.join(path, MANIFEST)):
            raise ArtifactError(f"{path} is a non-empty directory that is not an ember artifact; ember will not "
                                "replace it even with overwrite — choose another path")


def export_artifact(model, path, *, overwrite: bool = False) -> str:
    path = os.path.abspath(os.fspath(path))
    _refuse_existing(path, overwrite)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".ember-export-", dir=parent)
    try:
        if path.endswith(".tar"):
            stage = os.path.join(tmp, "artifact")
            os.makedirs(stage)
            _write_dir(model, stage)
            tar_tmp = os.path.join(tmp, "artifact.tar")
            with tarfile.open(tar_tmp, "w") as tf:
                for f in (MANIFEST, LIB, PARAMS):
                    tf.add(os.path.join(stage, f), arcname=f)
            if os.path.lexists(path):
                os.remove(path) if not os.path.isdir(path) else shutil.rmtree(path)
            os.replace(tar_tmp, path)
        else:
            stage = os.path.join(tmp, "artifact")
            os.makedirs(stage)
            _write_dir(model, stage)
            if os.path.lexists(path):
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            os.replace(stage, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
