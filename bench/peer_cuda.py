"""Run the peer (../shared/bench/peer_torch.py) unchanged except for device placement, on a GPU.

The peer is CPU-only. To compare it with our recipes at accelerator scale (224 px, 30 epochs)
this loads its source, moves the network, the inputs, the labels and the loss weights to CUDA
and brings the probabilities back, and runs it. Every edit is listed in EDITS and must match
the peer's source exactly once, so a changed peer fails loudly instead of running half-patched.

    python bench/peer_cuda.py train ../shared/data/ham10000 --size 224 --epochs 30 \
        --extra ../shared/data/isic2017/labels.csv:test
    python bench/peer_cuda.py --peer path/to/peer_torch.py train ...   # the peer elsewhere
"""
import sys
from pathlib import Path

DEFAULT_PEER = Path(__file__).resolve().parents[2] / "shared" / "bench" / "peer_torch.py"

# (peer source, replacement): device placement only, nothing about the recipe changes.
EDITS = [
    ("return (torch.from_numpy(x).permute(", "return (torch.from_numpy(x).to(DEVICE).permute("),
    ("net = make_net()\n", "net = make_net().to(DEVICE)\n"),
    ("weight=weight / weight.mean(),", "weight=(weight / weight.mean()).to(DEVICE),"),
    ("torch.from_numpy(ytr[idx]))", "torch.from_numpy(ytr[idx]).to(DEVICE))"),
    ("/ len(views)).numpy())", "/ len(views)).cpu().numpy())"),
]


def patched_source(source: str) -> str:
    for old, new in EDITS:
        if source.count(old) != 1:
            raise SystemExit(f"peer_cuda: expected exactly one {old!r} in the peer's source; it has changed")
        source = source.replace(old, new)
    return source


def main(argv: list[str]) -> None:
    peer = DEFAULT_PEER
    if argv[:1] == ["--peer"]:
        peer, argv = Path(argv[1]), argv[2:]
    import torch  # noqa: PLC0415 (here, so the tests can check EDITS without torch)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"peer_cuda: running {peer} on {device}", file=sys.stderr)
    sys.argv = [str(peer), *argv]
    namespace = {"__name__": "__main__", "__file__": str(peer), "DEVICE": device}
    exec(compile(patched_source(peer.read_text()), str(peer), "exec"), namespace)


if __name__ == "__main__":
    main(sys.argv[1:])
