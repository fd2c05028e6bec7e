#!/usr/bin/env python
"""Host CPU ms per image of ``--decode-on device`` against ``--decode-on loader``: in the
DataLoader worker, and in the training process receiving the batch.

Worker side: the loader item decodes the JPEG with PIL and makes the two RandomResizedCrop views
(:class:`TwoCropsLoader`); the device item only reads the file, parses the header and draws
the two boxes (:class:`EncodedTwoCrops`), and its decoding runs on the training device. Both
are timed with ``time.thread_time`` around each item inside one thread, as
``benchmarks/pretrain_throughput.py`` does in its workers, over ``--rounds`` passes of
``--num-images`` files (the median pass is reported).

Receiving: what the training process spends taking one ``--decode-on device`` batch off the
DataLoader, built as ``tools/pretrain_moco.py`` builds it (``build_parser``,
``benchmarks/common.py``) with ``-b --batch-size -j --workers``. Before each
batch the workers get ``--wait`` seconds to fill the prefetch queue; then ``next()`` on the
loader is timed with the main thread's CPU time (and the whole process's: on CUDA the pinning
thread counts too). It includes freeing the previous batch, as in the training loop. The mean
over ``--receive-batches`` batches is reported: a ``next()`` that finds its batch queued behind
the other worker's receives both and keeps one for later, so single batches vary.

Decoding: the last batch received is then decoded on ``--device`` as the training step does it
(``DeviceDecoder``: one batched ``decode_jpeg``, nvJPEG on CUDA, then the crops), a few times:
wall ms per image with the device synced, and the training process's CPU ms per image.

Files: generated 500×375 JPEGs at quality 90 (or ``--data``).

    python benchmarks/decode_host_cost.py --num-images 64 --json decode_host_cost.json
"""

import statistics
import sys
import tempfile
import time

import common
import torch


def parse_args(argv):
    p = common.parser(__doc__, "decode_host_cost.json")
    p.add_argument("--data", default=None, help="image folder (default: generate JPEGs)")
    p.add_argument("--num-images", default=64, type=int, help="files timed in the worker")
    p.add_argument("--crop-size", default=224, type=int)
    p.add_argument("--rounds", default=3, type=int, help="passes over the images per path")
    p.add_argument("-b", "--batch-size", default=256, type=int, help="batch received")
    p.add_argument("-j", "--workers", default=2, type=int, help="DataLoader workers")
    p.add_argument("--receive-batches", default=5, type=int, help="batches received")
    p.add_argument("--wait", default=2.0, type=float, help="seconds before each batch")
    p.add_argument("--device", default="cpu", help="training device (pins on CUDA)")
    return p.parse_args(argv)


def host_ms_per_image(load, paths, rounds):
    """Median over ``rounds`` passes of the mean thread CPU ms per item."""
    passes = []
    for r in range(rounds):
        torch.manual_seed(r)
        total = 0.0
        for path in paths:
            start = time.thread_time()
            load(path)
            total += time.thread_time() - start
        passes.append(1000 * total / len(paths))
    return statistics.median(passes)


def measure(paths, crop_size, rounds):
    torch.set_num_threads(1)  # one worker's view: the crop's resize must not fan out
    items = common.worker_items(crop_size)
    loader = host_ms_per_image(items["loader"], paths, rounds)
    device = host_ms_per_image(items["device"], paths, rounds)
    return {
        "images": len(paths),
        "crop_size": crop_size,
        "rounds": rounds,
        "loader_ms_per_img": loader,
        "device_ms_per_img": device,
        "device_over_loader": device / loader,
    }


def receive_cost(data, args):
    """Main-thread and process CPU ms per image of taking a waiting ``--decode-on device`` batch
    from the tool's loader (means over the batches), and the wall ms of each ``next()``."""
    device = common.device(args.device)
    steps = len(common.image_paths(data)) // args.batch_size
    epochs = -(-args.receive_batches // steps)  # one loader iterator serves them all
    argv = [data, "-b", str(args.batch_size), "-j", str(args.workers), "--seed", "0"]
    argv += ["--crop-size", str(args.crop_size), "--decode-on", "device", "--device", args.device]
    tool = common.pretrain_run(argv + ["--epochs", str(epochs)], device)
    train = common.train_data(tool, data)
    loader = common.train_loader(train, tool, device)
    thread_ms, process_ms, wall_ms = [], [], []
    batch = None
    for epoch in range(epochs):
        batches = iter(loader.epoch(epoch))
        for _ in range(min(steps, args.receive_batches - len(wall_ms))):
            time.sleep(args.wait)
            thread, process, wall = time.thread_time(), time.process_time(), time.perf_counter()
            batch = next(batches)  # the previous batch is freed here, as in the training loop
            wall_ms.append((time.perf_counter() - wall) * 1e3)
            thread_ms.append((time.thread_time() - thread) * 1e3 / args.batch_size)
            process_ms.append((time.process_time() - process) * 1e3 / args.batch_size)
    decode_ms, decode_cpu_ms = device_decode_ms(train.decode, batch[0], device)
    del batch
    return {
        "decode_ms_per_img": decode_ms,
        "decode_cpu_ms_per_img": decode_cpu_ms,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "device": str(device),
        "receive_batches": len(wall_ms),
        "receive_ms_per_img": statistics.mean(thread_ms),
        "receive_process_ms_per_img": statistics.mean(process_ms),
        "receive_ms_per_img_each": thread_ms,
        "receive_wall_ms_per_batch": wall_ms,
    }


def device_decode_ms(decode, batch, device, repeats=3):
    """(wall, process CPU) ms per image of ``decode(batch, device)``: the median of ``repeats``
    after one untimed call."""
    decode(batch, device)
    wall, cpu = [], []
    for _ in range(repeats):
        common.sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        views, _ = decode(batch, device)
        common.sync(device)
        wall.append((time.perf_counter() - start) * 1e3 / len(views))
        cpu.append((time.process_time() - start_cpu) * 1e3 / len(views))
    return statistics.median(wall), statistics.median(cpu)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or common.make_jpeg_folder(tmp, max(args.num_images, args.batch_size))
        result = measure(common.image_paths(data)[: args.num_images], args.crop_size, args.rounds)
        result.update(receive_cost(data, args))
    rows = [
        ["loader", result["loader_ms_per_img"]],
        ["device (worker side)", result["device_ms_per_img"]],
        ["device (training process, receive)", result["receive_ms_per_img"]],
    ]
    common.print_table(["--decode-on", "host ms/img"], rows)
    print(f"device/loader in the worker: {result['device_over_loader']:.3f}x")
    print(
        f"decode on {args.device}: {common.fmt(result['decode_ms_per_img'])} ms/img wall, "
        f"{common.fmt(result['decode_cpu_ms_per_img'])} ms/img training-process CPU"
    )
    print(
        f"receive: batch {args.batch_size}, -j {args.workers}, mean of "
        f"{result['receive_batches']} batches; process CPU "
        f"{common.fmt(result['receive_process_ms_per_img'])} ms/img"
    )
    result["summary"] = (
        f"decode {common.fmt(result['decode_ms_per_img'])} ms/img, receive "
        f"{common.fmt(result['receive_ms_per_img'])} ms/img CPU"
    )
    common.write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
