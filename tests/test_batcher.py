"""The in-process adaptive batcher (service/batcher.py) and the local core (service/core.py).

The batcher's model here is a real function on a real thread that records every batch it is
given; the local core runs the real published model.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batcher import AdaptiveBatcher

S = 4


def images(n: int, first: int) -> np.ndarray:
    """``(n, S, S, 3)`` uint8 whose pixel values are their ids ``first..first+n-1``."""
    ids = np.arange(first, first + n, dtype=np.uint8)
    return np.broadcast_to(ids[:, None, None, None], (n, S, S, 3)).copy()


class Model:
    """Row i of the output = mean pixel of image i (its id); records batch sizes."""

    def __init__(self, seconds: float = 0.0, fail_on: int | None = None) -> None:
        self.seconds, self.fail_on = seconds, fail_on
        self.batches: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        self.batches.append(len(batch))
        time.sleep(self.seconds)
        if self.fail_on is not None and self.fail_on in batch[:, 0, 0, 0]:
            raise RuntimeError("model failed on this batch")
        return batch.reshape(len(batch), -1).mean(axis=1, keepdims=True).astype(np.float32)


def test_concurrent_callers_share_batches_and_each_gets_its_own_rows():
    model = Model(seconds=0.02)
    batcher = AdaptiveBatcher(model, max_batch_size=8, max_wait_s=0.0)

    async def main():
        sizes = [1, 3, 2, 1, 4, 1, 2, 5, 1, 1]
        firsts = np.cumsum([0] + sizes[:-1])
        outs = await asyncio.gather(*(batcher.submit(images(n, f))
                                      for n, f in zip(sizes, firsts)))
        for out, n, f in zip(outs, sizes, firsts):
            np.testing.assert_array_equal(out[:, 0], np.arange(f, f + n))
        return sum(sizes)

    total = asyncio.run(main())
    batcher.close()
    assert sum(model.batches) == total
    assert max(model.batches) <= 8 and len(model.batches) < 10  # batches formed
    assert model.threads == {t for t in model.threads if t.startswith("batcher")}


def test_a_lone_request_does_not_wait_when_nothing_is_being_decoded():
    model = Model()
    batcher = AdaptiveBatcher(model, max_batch_size=32, max_wait_s=1.0, pending=lambda: 0)

    async def main():
        started = time.perf_counter()
        await batcher.submit(images(1, 0))
        return time.perf_counter() - started

    assert asyncio.run(main()) < 0.5  # max_wait_s is 1 s: it did not wait for company
    batcher.close()


def test_waits_for_images_being_decoded_up_to_the_bound():
    model = Model()
    decoding = {"n": 3}
    batcher = AdaptiveBatcher(model, max_batch_size=32, max_wait_s=0.5,
                              pending=lambda: decoding["n"])

    async def late(first: int) -> np.ndarray:
        await asyncio.sleep(0.05)
        decoding["n"] -= 1
        return await batcher.submit(images(1, first))

    async def main():
        first = asyncio.ensure_future(batcher.submit(images(1, 0)))
        await asyncio.gather(first, late(1), late(2), late(3))

    started = time.perf_counter()
    asyncio.run(main())
    assert model.batches == [4]  # the three decoding images joined the first one's batch
    assert time.perf_counter() - started < 0.5
    model.batches.clear()

    async def stuck():  # pending never drops: the batch runs after max_wait_s anyway
        decoding["n"] = 1
        t0 = time.perf_counter()
        await batcher.submit(images(1, 0))
        return time.perf_counter() - t0

    waited = asyncio.run(stuck())
    assert 0.45 < waited < 1.5 and model.batches == [1]
    batcher.close()


def test_a_failing_batch_fails_only_its_callers_and_the_batcher_goes_on():
    model = Model(seconds=0.05, fail_on=7)
    batcher = AdaptiveBatcher(model, max_batch_size=2, max_wait_s=0.0)

    async def main():
        results = await asyncio.gather(
            batcher.submit(images(2, 0)), batcher.submit(images(1, 7)),
            batcher.submit(images(1, 9)), return_exceptions=True)
        after = await batcher.submit(images(1, 20))
        return results, after

    results, after = asyncio.run(main())
    assert isinstance(results[1], RuntimeError)
    assert not isinstance(results[0], Exception) and results[0][:, 0].tolist() == [0, 1]
    assert after[:, 0].tolist() == [20]
    batcher.close()


def test_submit_refuses_empty_and_oversized_inputs():
    batcher = AdaptiveBatcher(Model(), max_batch_size=4, max_wait_s=0.0)
    for n in (0, 5):
        with pytest.raises(ValueError, match="submit 1..4"):
            asyncio.run(batcher.submit(images(n, 0)))
    with pytest.raises(ValueError):
        AdaptiveBatcher(Model(), max_batch_size=0, max_wait_s=0.0)
    batcher.close()


def test_local_core_encodes_like_onnxruntime_and_refuses_a_bad_reload(published, data_dir):
    from cnn_codes.settings import Settings
    from models.decode import decode_file
    from models.repository import resolve
    from models.runtime import open_session
    from service.core import LocalCore

    settings = Settings(repository=published["repository"], model_name=published["name"],
                        model_version=str(published["version"]), max_batch_size=4)
    model = resolve(settings.repository, settings.model_name, settings.model_version)
    core = LocalCore(model, settings)
    paths = sorted((data_dir / "val" / "bees").glob("*.jpg"))[:6]
    arrays = np.stack([decode_file(str(p), model.card.preprocessing) for p in paths])
    session = open_session(str(model.onnx_path))
    names = [o.name for o in model.card.outputs]
    reference = np.concatenate(session.run(names, {"images": arrays}), axis=1)

    async def main():
        outs = await asyncio.gather(*(core.encode(arrays[i:i + 1]) for i in range(6)))
        ref = await core.model_ref()
        refused = await core.load(model.card.version + 1)  # no such version
        return np.concatenate(outs), ref, refused

    packed, ref, refused = asyncio.run(main())
    core.close()
    np.testing.assert_allclose(packed, reference, rtol=1e-4, atol=1e-4)
    assert ref == {"name": published["name"], "version": published["version"]}
    assert refused["ok"] is False and refused["error"]
    assert core.sessions.card.version == published["version"]  # still serving
def test_two_runs_overlap_and_the_queue_grows_into_bigger_batches_meanwhile():
    """``runs=2``: two batches run at once (a barrier of two would time out otherwise);
    while both run slots are busy, later callers queue and form one bigger batch."""
    barrier = threading.Barrier(2, timeout=2.0)
    seen: list[int] = []

    def model(batch: np.ndarray) -> np.ndarray:
        seen.append(len(batch))
        if len(seen) <= 2:
            barrier.wait()  # the first two batches must be in flight together
        return batch.reshape(len(batch), -1).mean(axis=1, keepdims=True).astype(np.float32)

    async def main(batcher: AdaptiveBatcher) -> list[np.ndarray]:
        first = []
        for i in range(2):
            first.append(asyncio.ensure_future(batcher.submit(images(1, i))))
            await asyncio.sleep(0.1)  # this one's batch has started
        # both runs are now blocked on the barrier, each with one image
        later = [asyncio.ensure_future(batcher.submit(images(1, i))) for i in range(2, 6)]
        return await asyncio.gather(*first, *later, return_exceptions=True)

    batcher = AdaptiveBatcher(model, max_batch_size=8, max_wait_s=0.0, runs=2)
    outs = asyncio.run(main(batcher))
    batcher.close()
    assert [o[0, 0] for o in outs] == [0, 1, 2, 3, 4, 5]
    assert seen[:2] == [1, 1] and sorted(seen[2:]) == [4]  # the four late ones in one batch

    barrier.reset()
    seen.clear()
    serial = AdaptiveBatcher(model, max_batch_size=1, max_wait_s=0.0, runs=1)

    async def two() -> list:
        return await asyncio.gather(serial.submit(images(1, 0)), serial.submit(images(1, 1)),
                                    return_exceptions=True)

    results = asyncio.run(two())  # one run at a time: the barrier breaks
    serial.close()
    assert any(isinstance(r, threading.BrokenBarrierError) for r in results)
    with pytest.raises(ValueError, match="runs"):
        AdaptiveBatcher(model, max_batch_size=1, max_wait_s=0.0, runs=0)


def test_a_batch_that_starts_beside_another_runs_on_run_beside():
    """``run_beside`` takes a batch dispatched while another is running; a batch alone (the
    first, and the next one once both finished) takes ``run``."""
    barrier = threading.Barrier(2, timeout=2.0)
    calls: list[tuple[str, int]] = []

    def make(name: str):
        def model(batch: np.ndarray) -> np.ndarray:
            calls.append((name, int(batch[0, 0, 0, 0])))
            if len(calls) <= 2:
                barrier.wait()  # the first two batches are in flight together
            return batch.reshape(len(batch), -1).mean(axis=1, keepdims=True).astype(np.float32)
        return model

    batcher = AdaptiveBatcher(make("alone"), run_beside=make("beside"), max_batch_size=8,
                              max_wait_s=0.0, runs=2)

    async def main() -> list[np.ndarray]:
        first = asyncio.ensure_future(batcher.submit(images(1, 0)))
        await asyncio.sleep(0.1)  # its batch is running
        second = asyncio.ensure_future(batcher.submit(images(1, 1)))
        outs = await asyncio.gather(first, second)
        return [*outs, await batcher.submit(images(1, 2))]  # alone again

    outs = asyncio.run(main())
    batcher.close()
    assert [o[0, 0] for o in outs] == [0, 1, 2]
    assert calls == [("alone", 0), ("beside", 1), ("alone", 2)]


def test_local_core_runs_a_batch_beside_another_on_its_one_thread_session(published, data_dir):
    """The in-process core's two sessions (service.core.Sessions): the main one on the worker's
    intra-op threads, the ``beside`` one on ``beside_intra_op_threads``; both give the same
    CNN codes; ``beside_intra_op_threads=0`` or one batch in flight opens one session."""
    from cnn_codes.settings import Settings
    from models.decode import decode_file
    from models.repository import resolve
    from service.core import LocalCore

    base = dict(repository=published["repository"], model_name=published["name"],
                model_version=str(published["version"]), intra_op_threads=2)
    model = resolve(base["repository"], base["model_name"], base["model_version"])
    core = LocalCore(model, Settings(**base))
    try:
        sessions = core.sessions
        assert sessions.beside is not None
        assert sessions.alone.session.get_session_options().intra_op_num_threads == 2
        assert sessions.beside.session.get_session_options().intra_op_num_threads == 1
        paths = sorted((data_dir / "val" / "ants").glob("*.jpg"))[:3]
        arrays = np.stack([decode_file(str(p), model.card.preprocessing) for p in paths])
        np.testing.assert_allclose(sessions.run_beside(arrays), sessions.run(arrays),
                                   rtol=1e-4, atol=1e-4)
    finally:
        core.close()
    for extra in ({"beside_intra_op_threads": 0}, {"batch_runs": 1}):
        single = LocalCore(model, Settings(**base, **extra))
        assert single.sessions.beside is None
        single.close()


def test_claim_lone_only_when_idle_and_a_batch_meanwhile_runs_beside():
    """``claim_lone`` gives a run slot only when nothing is queued, forming or running; while
    the slot is held, a submitted batch runs on ``run_beside`` (the slot counts like a running
    batch); ``release`` observes the lone run as a batch and frees the slot, once."""
    calls: list[tuple[str, int]] = []
    observed: list[tuple[int, float]] = []

    def make(name: str):
        def model(batch: np.ndarray) -> np.ndarray:
            calls.append((name, int(batch[0, 0, 0, 0])))
            time.sleep(0.05)
            return batch.reshape(len(batch), -1).mean(axis=1, keepdims=True).astype(np.float32)
        return model

    alone = make("alone")
    batcher = AdaptiveBatcher(alone, run_beside=make("beside"), max_batch_size=8,
                              max_wait_s=0.0, runs=2,
                              observe=lambda n, s: observed.append((n, s)))

    async def main() -> None:
        lone = await batcher.claim_lone()
        assert lone is not None and lone.run is alone
        assert await batcher.claim_lone() is None  # one slot held: not idle any more
        beside = await batcher.submit(images(1, 7))  # runs while the lone slot is held
        assert beside[0, 0] == 7
        out = await asyncio.to_thread(lone.run, images(1, 3))  # the caller's own thread
        assert out[0, 0] == 3
        lone.release(1, 0.25)
        lone.release(1, 0.25)  # a second release changes nothing
        running = asyncio.ensure_future(batcher.submit(images(2, 10)))
        await asyncio.sleep(0.01)  # its batch is running on the batcher's thread
        assert await batcher.claim_lone() is None
        await running
        again = await batcher.claim_lone()  # idle again
        assert again is not None
        again.release()  # released without a run: nothing observed

    asyncio.run(main())
    batcher.close()
    assert calls == [("beside", 7), ("alone", 3), ("alone", 10)]
    assert (1, 0.25) in observed and observed.count((1, 0.25)) == 1
    assert sorted(n for n, _ in observed) == [1, 1, 2]


def test_a_lone_request_runs_on_its_decode_thread_and_answers_as_a_batch_would(
        published, data_dir, monkeypatch):
    """The pipeline with the real in-process core: a request alone is decoded and run on one
    decode thread (no batcher thread), counted as a batch of one on the ``alone`` session, and
    gets the same CNN codes as through the batcher (``lone_runs`` off); concurrent requests
    still batch; a photo that fails to decode in a lone request is its error row and frees
    the slot."""
    import service.pipeline as pipeline_module
    from cnn_codes.settings import Settings
    from models.repository import resolve
    from service import metrics
    from service.core import LocalCore
    from service.pipeline import InferencePipeline
    from service.served import ModelHolder

    ran_on: list[str] = []
    real_decode_then_run = pipeline_module._decode_then_run

    def spying(*args, **kwargs):
        ran_on.append(threading.current_thread().name)
        return real_decode_then_run(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "_decode_then_run", spying)
    base = dict(repository=published["repository"], model_name=published["name"],
                model_version=str(published["version"]), intra_op_threads=2)
    model = resolve(base["repository"], base["model_name"], base["model_version"])
    photos = [p.read_bytes() for p in sorted((data_dir / "val" / "ants").glob("*.jpg"))[:6]]

    def serve(lone_runs: bool):
        settings = Settings(**base, lone_runs=lone_runs)
        pipeline: InferencePipeline | None = None
        core = LocalCore(model, settings, pending=lambda: pipeline.decoding)
        pipeline = InferencePipeline(ModelHolder(model.card), settings, core.encode,
                                     claim_lone=core.claim_lone)
        return core, pipeline

    def runs(session: str) -> float:
        return metrics.BATCH_RUNS.labels(session=session)._value.get()

    async def one_by_one(pipeline):
        return [await pipeline.run([p], endpoint="embed") for p in photos]

    core, pipeline = serve(lone_runs=True)
    try:
        alone_before, batches_before = runs("alone"), metrics.BATCH_SIZE._sum.get()
        lone = asyncio.run(one_by_one(pipeline))
        assert ran_on == [n for n in ran_on if n.startswith("decode_")] and len(ran_on) == 6
        assert runs("alone") - alone_before == 6  # six batches of one, on the alone session
        assert metrics.BATCH_SIZE._sum.get() - batches_before == 6
        bad = asyncio.run(pipeline.run([photos[0][:200]], endpoint="embed"))
        assert bad.outputs is None and list(bad.decoded.errors) == [0]
        assert len(ran_on) == 7

        async def together():
            return await asyncio.gather(*(pipeline.run([p], endpoint="embed") for p in photos))

        assert len(asyncio.run(together())) == 6
        assert len(ran_on) <= 8  # the first may find the core idle; the others are batched
        assert core.batcher._held == 0 and core.batcher._running == 0  # every slot freed
    finally:
        pipeline.close()
        core.close()
    ran_on.clear()
    core, pipeline = serve(lone_runs=False)
    try:
        batched = asyncio.run(one_by_one(pipeline))
    finally:
        pipeline.close()
        core.close()
    assert ran_on == []  # never on a decode thread
    for a, b in zip(lone, batched):
        np.testing.assert_allclose(a.outputs["embedding"], b.outputs["embedding"],
                                   rtol=1e-5, atol=1e-5)


def test_a_cancelled_lone_request_frees_its_slot_only_when_its_thread_is_done(published,
                                                                              data_dir):
    """A client gone mid-request cancels the lone request's task; the model run on its decode
    thread goes on, and the run slot stays counted until that run ends (no third run slips
    in beside two), then is freed and observed."""
    from cnn_codes.settings import Settings
    from models.card import OUTPUT_NAMES, ModelCard
    from service.pipeline import InferencePipeline
    from service.served import ModelHolder

    card = ModelCard.model_validate_json((published["path"] / "model_card.json").read_text())
    width = sum(card.dim(name) for name in OUTPUT_NAMES)
    finished = threading.Event()
    observed: list[int] = []

    def slow_model(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.4)
        finished.set()
        return np.zeros((len(batch), width), dtype=np.float32)

    batcher = AdaptiveBatcher(slow_model, max_batch_size=8, max_wait_s=0.0, runs=2,
                              observe=lambda n, s: observed.append(n))

    async def never(batch):  # the lone path must not use the batcher's submit
        raise AssertionError("submitted")

    pipeline = InferencePipeline(ModelHolder(card), Settings(decode_threads=1), never,
                                 claim_lone=batcher.claim_lone)
    photo = sorted((data_dir / "val" / "ants").glob("*.jpg"))[0].read_bytes()

    async def main() -> None:
        task = asyncio.ensure_future(pipeline.run([photo], endpoint="embed"))
        await asyncio.sleep(0.15)  # decoded, and the slow run has started
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not finished.is_set() and batcher._held == 1  # still running: still counted
        while not finished.is_set():
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)  # the thread's result reaches the loop
        assert batcher._held == 0 and batcher._running == 0

    try:
        asyncio.run(main())
    finally:
        pipeline.close()
        batcher.close()
    assert observed == [1]
