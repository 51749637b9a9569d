"""The demo under load: 20 concurrent ``gradio_client`` users against ``dogbench serve``, latency p50/p95.

    .venv/bin/python benchmarks/serve_load.py --json serve_load.json

Without ``--run`` it first makes a run like the browser test's (``dogbench run`` on the same six breeds of
``../shared/data/stanford-dogs-dev``, EfficientNet-Lite0 and DINOv2 ViT-S/14 from ``../shared/weights``; without
its second test set, shots and seeds, which the demo does not use). Then, for
each ``--concurrency`` (the server's Gradio queue limit), on a fresh server:

1. idle: ``--idle`` requests one after another (no queue): the latency of one request; and the same for a
   12-megapixel phone photo (an original upscaled to 4000 x 3000, JPEG quality 92);
2. load: ``--rounds`` rounds of ``--users`` clients (one ``Client`` each, as separate people would be) sending one
   request each at the same moment (a barrier), on different full-size photos of
   ``../shared/data/stanford-dogs-originals``; latency measured by each client from send to answer (queueing
   included); requests per second = users / the round's wall time. Both the API's ``/classify`` (top-5 of every
   model) and the page's ``/explain`` (top-5 plus attention rollout / Grad-CAM overlays).

Every ``/classify`` answer is checked against ``dogbench predict`` on the same photos (same breeds, probabilities
within 1e-6); a mismatch fails the benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEV = SHARED / "data" / "stanford-dogs-dev"
ORIGINALS = SHARED / "data" / "stanford-dogs-originals"
CNN = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
VIT = SHARED / "weights" / "vit_small_patch14_dinov2.imgfocus.fp16.safetensors"
BREEDS = ("n02085620-Chihuahua", "n02085936-Maltese_dog", "n02099601-golden_retriever", "n02106662-German_shepherd",
          "n02109525-Saint_Bernard", "n02110958-pug")


def make_run(base: Path) -> Path:
    """The browser test's run: six breeds of the dev set (official lists filtered), both real backbones."""
    import scipy.io

    from dogbench.cli import main

    data = base / "dogs"
    (data / "Images").mkdir(parents=True)
    (data / "lists").mkdir()
    for breed in BREEDS:
        (data / "Images" / breed).symlink_to(DEV / "Images" / breed, target_is_directory=True)
    for split in ("train", "test"):
        mat = scipy.io.loadmat(DEV / "lists" / f"{split}_list.mat")
        files = [str(f[0][0]) for f in mat["file_list"] if str(f[0][0]).split("/")[0] in BREEDS]
        labels = [BREEDS.index(f.split("/")[0]) + 1 for f in files]
        def cells(strings: list[str]) -> np.ndarray:
            column = np.empty((len(strings), 1), dtype=object)
            for i, text in enumerate(strings):
                column[i, 0] = np.array([text])
            return column

        scipy.io.savemat(data / "lists" / f"{split}_list.mat",
                         {"file_list": cells(files), "annotation_list": cells([f.rsplit(".", 1)[0] for f in files]),
                          "labels": np.array(labels, dtype=np.float64).reshape(-1, 1)})
    args = ["run", "--data", str(data), "--out", str(base / "run"), "--cache-dir", str(base / "cache"), "--quiet",
            "--backbone", f"cnn=tf_efficientnet_lite0@{CNN}",
            "--backbone", f"vit=vit_small_patch14_dinov2@{VIT},img_size=224,crop_pct=0.875", "--trials", "8"]
    if main(args) != 0:
        sys.exit("making the run failed")
    return base / "run"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def one_round(url: str, photos: list[Path], endpoint: str) -> tuple[list[float], float, list[Any]]:
    """``len(photos)`` clients, one request each, released together; per-request latency (s), wall (s), answers."""
    from gradio_client import Client, handle_file

    clients = [Client(url, verbose=False) for _ in photos]
    barrier = threading.Barrier(len(photos) + 1)
    latency = [0.0] * len(photos)
    answers: list[Any] = [None] * len(photos)

    def user(i: int) -> None:
        args = (handle_file(str(photos[i])), 5) if endpoint == "/classify" else (handle_file(str(photos[i])),)
        barrier.wait()
        start = time.perf_counter()
        answers[i] = clients[i].predict(*args, api_name=endpoint)
        latency[i] = time.perf_counter() - start

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(photos))]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return latency, time.perf_counter() - start, answers


def check_against_predict(run: Path, photos: list[Path], answers: list[dict]) -> int:
    """How many (photo, model) answers equal ``dogbench predict``'s; exits on the first mismatch."""
    import contextlib
    import io

    from dogbench.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        if main(["predict", str(run), *map(str, photos), "--format", "json", "--quiet"]) != 0:
            sys.exit("dogbench predict failed on the load photos")
    printed = {Path(p["image"]).name: p["models"] for p in json.loads(out.getvalue())["predictions"]}
    same = 0
    for photo, doc in zip(photos, answers, strict=True):
        for label, top in printed[photo.name].items():
            got = doc["models"][label]["top"]
            if [t["breed"] for t in got] != [t["breed"] for t in top] or \
                    max(abs(a["p"] - b["p"]) for a, b in zip(got, top, strict=True)) > 1e-6:
                sys.exit(f"MISMATCH {photo.name} {label}: served {got} but predict says {top}")
            same += 1
    return same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, help="a finished run folder (default: make the browser test's run)")
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle", type=int, default=10)
    ap.add_argument("--concurrency", default="1,2,4", help="the server's queue concurrency limits to compare")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from dogbench.atomic import atomic_write_text
    from dogbench.serve import ServeConfig, serve

    tmp = tempfile.TemporaryDirectory(prefix="dogbench-serve-load-")
    run = args.run or make_run(Path(tmp.name))
    photos = sorted((ORIGINALS / "Images").rglob("*.jpg"))
    load_photos = photos[::max(1, len(photos) // args.users)][: args.users]
    from PIL import Image

    twelve_mp = Path(tmp.name) / "phone-12mp.jpg"
    with Image.open(photos[0]) as im:
        im.convert("RGB").resize((4000, 3000), Image.LANCZOS).save(twelve_mp, quality=92)
    import torch

    torch_threads = torch.get_num_threads()
    report: dict[str, Any] = {"run": str(run), "users": args.users, "rounds": args.rounds, "cpus": os.cpu_count(),
                              "torch_threads": torch_threads, "photos": [p.name for p in load_photos], "servers": []}
    print(f"{args.users} users x {args.rounds} rounds, {os.cpu_count()} CPUs; run {run}")
    print(f"{'concurrency':>11} {'endpoint':>9} {'idle p50':>9} {'12 MP':>7} {'p50':>7} {'p95':>7} {'max':>7} "
          f"{'req/s':>6}")
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        app = serve(run, ServeConfig(port=free_port(), concurrency=concurrency), block=False)
        try:
            from gradio_client import Client, handle_file

            client = Client(app.local_url, verbose=False)
            for endpoint in ("/classify", "/explain"):
                extra = (5,) if endpoint == "/classify" else ()
                client.predict(handle_file(str(photos[0])), *extra, api_name=endpoint)  # warm-up
                idle = []
                for photo in photos[: args.idle]:
                    start = time.perf_counter()
                    client.predict(handle_file(str(photo)), *extra, api_name=endpoint)
                    idle.append(time.perf_counter() - start)
                phone = []  # a 12-megapixel phone photo (an original upscaled to 4000 x 3000, JPEG q92), idle
                for _ in range(max(3, args.idle // 2)):
                    start = time.perf_counter()
                    client.predict(handle_file(str(twelve_mp)), *extra, api_name=endpoint)
                    phone.append(time.perf_counter() - start)
                rounds = []
                for _ in range(args.rounds):
                    latency, wall, answers = one_round(app.local_url, load_photos, endpoint)
                    if endpoint == "/classify":
                        checked = check_against_predict(run, load_photos, answers)
                    rounds.append({"latency_s": latency, "wall_s": wall, "req_per_s": len(latency) / wall})
                every = [x for r in rounds for x in r["latency_s"]]
                row = {"concurrency": concurrency, "endpoint": endpoint, "idle_p50_s": statistics.median(idle),
                       "idle_12mp_p50_s": statistics.median(phone), "twelve_mp_bytes": twelve_mp.stat().st_size,
                       "p50_s": pct(every, 50), "p95_s": pct(every, 95), "max_s": max(every),
                       "round_p50_s": [pct(r["latency_s"], 50) for r in rounds],
                       "round_p95_s": [pct(r["latency_s"], 95) for r in rounds],
                       "req_per_s_median": statistics.median(r["req_per_s"] for r in rounds), "rounds": rounds}
                if endpoint == "/classify":
                    row["answers_equal_to_predict"] = checked * args.rounds
                report["servers"].append(row)
                print(f"{concurrency:>11} {endpoint:>9} {row['idle_p50_s']:>8.2f}s {row['idle_12mp_p50_s']:>6.2f}s "
                      f"{row['p50_s']:>6.2f}s "
                      f"{row['p95_s']:>6.2f}s {row['max_s']:>6.2f}s {row['req_per_s_median']:>6.2f}")
        finally:
            app.close()
    print("every /classify answer under load equals dogbench predict's (breeds, and probabilities within 1e-6)")
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
