"""Prepare a device run of ``bench/gpu.py`` on a machine with no package registry: the wheels
it lacks, in this environment's exact versions, and the toy world, inside the repository where
the device tool carries them (``make gpu-prep``; both folders are ignored by git).

    python bench/gpu_prep.py [--wheels .whl] [--toy .gpu/toy]

Wheels: every package of fusechat's dependency closure that the device image lacks, for
CPython 3.12 on x86-64 Linux; the transformers stack (transformers, tokenizers, huggingface-hub,
peft, accelerate, safetensors) always, so the device runs the versions the tests ran (its image
holds older ones). torch, numpy and the CUDA libraries stay the image's; fusechat itself is
not a wheel (it would go stale): ``bench/gpu_device.sh`` lays out the carried tree's. The last
line is one JSON object: what was prepared and its size (the tool carries 64 MiB at most).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The device image's packages (its 'cuda' image as read on 2026-11-17; the device tool's KINDS.md)
IMAGE = set(
    """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs build
certifi charset-normalizer click cloudpickle colorama contourpy cycler filelock fonttools
frozenlist fsspec h11 hf-xet httpcore httpx huggingface-hub idna jinja2 joblib kiwisolver
markdown-it-py markupsafe matplotlib mdurl mpmath multidict networkx numpy packaging pandas
peft pillow pip platformdirs propcache protobuf psutil pyarrow pygments pyparsing
python-dateutil pyyaml regex requests rich safetensors scipy sentencepiece setuptools
shellingham six sympy tiktoken tokenizers torch tqdm transformers triton typer
typing-extensions urllib3 wheel xxhash yarl zipp
""".split()
)
ALWAYS = {"transformers", "tokenizers", "huggingface-hub", "peft", "accelerate", "safetensors"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]  # fmt: skip


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str = "fusechat") -> dict[str, str]:
    """Every installed distribution ``root`` needs (extras left out): name -> version."""
    found: dict[str, str] = {}
    todo = [root]
    while todo:
        name = norm(todo.pop())
        if name in found:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # a marker excluded it here (another Python or platform)
        found[name] = dist.version
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.split(r"[ ;<>=!~\[(]", req)[0])
    found.pop(norm(root))
    return found


def device_wheels(found: dict[str, str]) -> dict[str, str]:
    """Of ``closure()``, what the device needs carried: what its image lacks, and the
    transformers stack at these versions."""
    return {n: v for n, v in found.items() if n not in IMAGE or n in ALWAYS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", type=Path, default=ROOT / ".whl")
    ap.add_argument("--toy", type=Path, default=ROOT / ".gpu" / "toy")
    ap.add_argument("--toy-from", type=Path, help="the built toy world (default: the cache's)")
    args = ap.parse_args()
    from fusechat.io import atomic_dir, cache_dir

    src = args.toy_from or cache_dir() / "toy"
    if not (src / "manifest.json").exists():
        raise SystemExit(f"{src}: no toy world; build it first (fusechat toy build --out {src})")
    need = device_wheels(closure())
    pins = [f"{n}=={v}" for n, v in sorted(need.items())]
    # each folder renamed into place whole: a failed download leaves the last complete one
    with atomic_dir(args.wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "-d", str(tmp)]  # fmt: skip
        for p in PLATFORMS:
            cmd += ["--platform", p]
        if subprocess.run(cmd + pins).returncode:
            raise SystemExit(
                f"pip download of {len(pins)} wheels failed (above); {args.wheels} kept"
            )
    with atomic_dir(args.toy) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    size = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            for p in (args.wheels, args.toy)}  # fmt: skip
    print(json.dumps({"wheels": sorted(f.name for f in args.wheels.glob("*.whl")),
                      "wheels_mb": round(size[args.wheels] / 2**20, 1),
                      "toy_mb": round(size[args.toy] / 2**20, 1)}))  # fmt: skip


if __name__ == "__main__":
    main()
