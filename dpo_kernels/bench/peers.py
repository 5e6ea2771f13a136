"""The peer packages the benchmarks compare against, each pinned once.

Every place that names a peer's version reads it here: the providers' descriptions and install hints
(`bench/providers/`), the versions a report's stamp lists (`bench/report.py`), the wheels `make gpu-wheels` downloads
for the GPU machine, and which benchmark rows `benchmarks/gpu_check.sh` loses when one of them does not install.

A peer is a package the benchmarks compare against, or (`since`) the release of one that the run already has from
which on a provider exists: `torch_native` is `F.linear_cross_entropy`, in torch from 2.13.

The module uses the standard library only and runs as a file, so that the Makefile and the GPU script can read it
where dpo_kernels is not built or its needs are missing (the GPU machine has no network):

    python dpo_kernels/bench/peers.py --wheels            # `name==version` of every wheel gpu_check.sh installs
    python dpo_kernels/bench/peers.py --packages          # their distribution names
    python dpo_kernels/bench/peers.py --needed-by WHEEL   # the gpu_check rows that need WHEEL (a file name or dist)
"""
import argparse
import importlib.metadata
import re
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Peer:
    """One peer: `provider` is its name in every op's provider table (`bench/providers/`), `package` its
    distribution as pip names it, `version` the pin (the version the peer numbers were measured with:
    docs/design.md, "Benchmarks") or, with `since`, the first release that has the provider, `name` and `short` how
    descriptions and gpu_check's log name it, `rows` the gpu_check rows that need it (logged when its wheel fails),
    `needs` the pinned wheels of what it imports that the GPU image lacks, and `wheel` whether `make gpu-wheels`
    brings it to the GPU machine (False where it comes with the image, or does not fit the size limit)."""

    provider: str
    package: str
    version: str
    name: str
    short: str
    rows: str
    needs: tuple = ()
    wheel: bool = True
    since: bool = False

    @property
    def title(self) -> str:
        """`name version` (`name >= version` for a `since` peer), as provider descriptions open."""
        return f"{self.name} {'>= ' if self.since else ''}{self.version}"

    @property
    def pin(self) -> str:
        return f"{self.package}{'>=' if self.since else '=='}{self.version}"

    @property
    def install_hint(self) -> str:
        if self.since:
            return f"needs {self.package} >= {self.version}; this is {self.package} {_installed(self.package)}"
        return f"pip install {self.pin}"


def _installed(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


# The GPU image has Python 3.12 with torch 2.11, Triton 3.6, transformers 5.17, accelerate, pandas, xxhash, fsspec,
# huggingface-hub, psutil, jinja2, pyyaml and tqdm; `needs` is what a peer imports beyond that. The wheels go without
# their own needs (--no-deps), so that the set stays one version of each and small: the working tree that travels to
# the machine, these wheels included, is limited to 64 MiB. datasets 5.2 needs pyarrow>=24, and the image's pyarrow
# is not known to be that new; pyarrow 24 is the smallest that does (26 alone would take the set over the limit).
# QuACK has no wheel in the set: it imports nvidia-cutlass-dsl 4.8.1, whose CUDA library wheel
# (nvidia-cutlass-dsl-libs-cu12 or -cu13) is 87 MiB alone, over the 60 MiB that travels; its rows run where it is
# installed. The GPU image's torch 2.11 has no F.linear_cross_entropy, so the torch_native rows wait for an image
# with torch >= 2.13.
PEERS = (
    Peer("trl", "trl", "1.16.0", "TRL", "TRL",
         rows="the trl rows of bench-linear, memory and bench-logits; trl-step; the TRL test in cuda-tests",
         needs=("datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "pyarrow==24.0.0")),
    Peer("liger", "liger-kernel", "0.8.5", "Liger-Kernel", "Liger",
         rows="the liger rows of bench-linear-peers, memory-peers and bench-logits-peers"),
    Peer("cce", "cut-cross-entropy", "25.1.1", "Cut Cross-Entropy", "CCE",
         rows="the cce rows of bench-linear-peers and memory-peers"),
    Peer("torch_native", "torch", "2.13.0", "PyTorch", "torch",
         rows="the torch_native rows of bench-linear-peers and memory-peers", wheel=False, since=True),
    Peer("quack", "quack-kernels", "0.6.5", "QuACK", "QuACK",
         rows="the quack rows of bench-linear-peers, memory-peers and bench-logits-peers", wheel=False),
)
BY_PROVIDER = {peer.provider: peer for peer in PEERS}
# The distributions a report's stamp lists between the torch stack and dpo_kernels (torch heads the stamp).
PACKAGES = tuple(peer.package for peer in PEERS if peer.package != "torch")


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them: `Liger_Kernel` and `liger-kernel` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheels() -> list:
    """The `name==version` pins of every wheel the GPU machine installs: each peer that travels, then what it
    needs."""
    return [pin for peer in PEERS if peer.wheel for pin in (peer.pin, *peer.needs)]


def needed_by(wheel: str) -> str:
    """The gpu_check rows that need `wheel`, a wheel's file name (`liger_kernel-0.8.5-py3-none-any.whl`) or a
    distribution name, with the peer that brings it."""
    dist = normalize(wheel.rsplit("/", 1)[-1].split("-", 1)[0] if wheel.endswith(".whl") else wheel)
    for peer in (peer for peer in PEERS if peer.wheel):
        if dist == normalize(peer.package):
            return f"{peer.short}: {peer.rows}"
        if dist in {normalize(pin.split("==")[0]) for pin in peer.needs}:
            return f"{peer.short} ({dist}): {peer.rows}"
    return f"whatever imports {dist}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--wheels", action="store_true", help="the pins of every wheel gpu_check.sh installs")
    what.add_argument("--packages", action="store_true", help="the distribution names of those wheels")
    what.add_argument("--needed-by", metavar="WHEEL", help="the gpu_check rows that need WHEEL")
    args = parser.parse_args(argv)
    if args.needed_by:
        print(needed_by(args.needed_by))
    else:
        pins = wheels()
        print(" ".join(pins if args.wheels else [pin.split("==")[0] for pin in pins]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
