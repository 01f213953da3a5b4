"""The graph-captured PyTorch peers of PERFORMANCE.md, measured in the same run as our benchmark.

Imports the eager SparseMixer-v1 and Switch routers from ../shared/peers/routing_peers.py
(path given by ROUTING_PEERS, default: beside this file's repository), captures one routing step
(forward + backward to the logits) in a CUDA graph, and times its replays with CUDA events
(median of 50): pure GPU time, without PyTorch's launch overhead. Also times, at the E = 16 and
E = 32 sizes that routing_peers.py does not cover, those peers eagerly and Hugging Face's PhiMoE
`sparsemixer` (top-2, eager, as routing_peers.py does) when transformers is importable. Prints
one JSON line per size and writes $OUT/graphed_peers.json.
"""
import importlib.util
import json
import os
import sys

import torch

here = os.path.dirname(os.path.abspath(__file__))
path = os.environ.get("ROUTING_PEERS",
                      os.path.join(here, "..", "..", "shared", "peers", "routing_peers.py"))
spec = importlib.util.spec_from_file_location("routing_peers", path)
peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(peers)


def graphed_step(router, x, gy):
    def run():
        x.grad = None
        _, m = router(x)
        m.backward(gy)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture, as torch.cuda.graphs asks
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def eager_step(router, x, gy):
    def run():
        x.grad = None
        _, m = router(x)
        m.backward(gy)
    return run


def hf_sparsemixer():
    try:
        from transformers.models.phimoe import modeling_phimoe
        return getattr(modeling_phimoe, "sparsemixer", None)
    except Exception:  # noqa: BLE001 -- reported as absent in the rows
        return None


def main():
    torch.manual_seed(0)
    rows = []
    hf = hf_sparsemixer()
    extra = ((32768, 16), (131072, 16), (32768, 32), (131072, 32))  # not in routing_peers.py
    for dtype in (torch.float32, torch.bfloat16):
        for T, E in ((4096, 8), (32768, 8), (32768, 64), (131072, 64), (131072, 128)) + extra:
            x = torch.randn(T, E, device="cuda", dtype=dtype, requires_grad=True)
            gy = torch.randn(T, 1, device="cuda", dtype=dtype)
            row = {"dtype": str(dtype).split(".")[-1], "T": T, "E": E}
            for name, router in (("sparsemixer_v1", peers.sparsemixer_v1),
                                 ("switch", peers.switch_router)):
                try:
                    row[name + "_graph_us"] = peers.timeit(graphed_step(router, x, gy))
                except Exception as ex:  # a peer that cannot be captured is reported, not hidden
                    row[name + "_graph_error"] = repr(ex)[:200]
            if (T, E) in extra:
                row["sparsemixer_v1_eager_us"] = peers.timeit(
                    eager_step(peers.sparsemixer_v1, x, gy))
                if hf is not None:
                    gy2 = torch.randn(T, 2, device="cuda", dtype=dtype)

                    def run_hf():
                        x.grad = None
                        mult, _ = hf(x, jitter_eps=0.01, training=True, top_k=2)
                        mult.backward(gy2)
                    try:
                        row["hf_phimoe_top2_us"] = peers.timeit(run_hf)
                    except Exception as ex:  # noqa: BLE001
                        row["hf_phimoe_error"] = repr(ex)[:200]
                else:
                    row["hf_phimoe_top2_us"] = None
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "graphed_peers.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
