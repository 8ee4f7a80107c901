"""Check the wheel bundle `launch/gpu_bundle.sh` built, list it, print the command for the GPU machine.

    python launch/gpu_bundle_check.py .whl 64

Fails (exit 1, naming what is wrong) when: the bundle and the working tree together pass the
limit of one call; a package comes in two versions; a wheel would replace the machine's torch,
CUDA libraries or another package it holds (except the deliberate `SHADOWED` ones); a requirement
of a bundled wheel, or a dependency of Ava, is neither in the bundle nor on the machine.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

# What the GPU machine's image holds (its package list, as read there) that Ava or the bundle's
# wheels need; Python 3.12.
DEVICE_HAS = {canonicalize_name(n) for n in (
    "torch", "triton", "numpy", "packaging", "psutil", "py-cpuinfo", "tqdm", "einops", "msgpack", "ninja",
    "nvidia-ml-py", "pyyaml", "filelock", "huggingface-hub", "pandas", "pyarrow", "requests", "xxhash", "httpx",
    "transformers", "tokenizers", "safetensors", "rich", "jinja2", "markupsafe", "matplotlib", "pillow",
    "setuptools", "typing-extensions", "fsspec",
)}
# on the machine too, but carried at the version the suite ran with: pydantic and pydantic-core
# need typing-extensions >= 4.16, datasets needs fsspec <= 2026.9.0, and the machine's versions
# are unknown here. They shadow the machine's copies for this process only (PYTHONPATH).
SHADOWED = {"typing-extensions", "fsspec"}
NEVER = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")  # the machine's own GPU stack
LEFT_OUT = {"wandb": "W&B is imported only by its sink; the benchmark's main job runs with logger=none"}
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
COMMAND = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "
           "/tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit; "
           "python3 -m ava.bench.cli gpu --workdir /tmp/ava-gpu --out $OUT/gpu.json 2>&1 | tee $OUT/gpu.log; "
           "tar czf $OUT/logs.tgz -C /tmp/ava-gpu --exclude=cache --exclude=checkpoints .")


def requirements(wheel: Path) -> set[str]:
    """The wheel's unconditional requirements on the target (extras and other platforms dropped)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    out = set()
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or Marker(str(req.marker)).evaluate(TARGET):
                out.add(canonicalize_name(req.name))
    return out


def ava_dependencies() -> set[str]:
    text = Path("pyproject.toml").read_text()
    block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    return {canonicalize_name(Requirement(m).name) for m in re.findall(r'"([^"]+)"', block)}


def tree_bytes() -> int:
    """Tracked files and untracked ones git does not ignore: what travels beside the wheels."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.split("\0")
    return sum(Path(p).stat().st_size for p in listed if p and Path(p).is_file())


def main(folder: str, limit_mib: str) -> int:
    wheels = sorted(Path(folder).glob("*.whl"))
    problems: list[str] = []
    names: dict[str, list[str]] = {}
    print(f"{'wheel':<72} {'KiB':>8}")
    for w in wheels:
        name, version, *_ = parse_wheel_filename(w.name)
        names.setdefault(name, []).append(str(version))
        print(f"{w.name:<72} {w.stat().st_size / 1024:>8,.0f}")
    bundle, tree = sum(w.stat().st_size for w in wheels), tree_bytes()
    limit = int(limit_mib) * 2**20
    print(f"{len(wheels)} wheels, {bundle / 2**20:.2f} MiB; with the working tree ({tree / 2**20:.2f} MiB) "
          f"{(bundle + tree) / 2**20:.2f} MiB of the {limit_mib} MiB one call carries")
    if bundle + tree > limit:
        problems.append(f"{(bundle + tree) / 2**20:.1f} MiB is over the {limit_mib} MiB limit")
    problems += [f"{n} in {len(v)} versions {v}: keep one" for n, v in names.items() if len(v) > 1]
    problems += [f"{n} would replace the machine's own GPU stack" for n in names if NEVER.match(n)]
    problems += [f"{n} is on the machine already (add it to SHADOWED with the reason, or drop it)"
                 for n in names if n in DEVICE_HAS and n not in SHADOWED]
    have = set(names) | DEVICE_HAS
    for w in wheels:
        missing = requirements(w) - have
        problems += [f"{w.name} needs {m}: neither bundled nor on the machine" for m in sorted(missing)]
    for dep in sorted(ava_dependencies() - have):
        if dep in LEFT_OUT:
            print(f"left out: {dep} ({LEFT_OUT[dep]})")
        else:
            problems.append(f"Ava depends on {dep}: neither bundled nor on the machine")
    if problems:
        print("gpu_bundle: " + "\n  ".join(["the bundle is not ready:", *problems]), file=sys.stderr)
        return 1
    print("\nOn the GPU machine (repository root, the .whl folder carried along), one call:\n" + COMMAND)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
