"""The scorer's batching of single requests, without Ray: what queues while a batch is scored is the next batch,
nothing waits when idle, a bad request fails alone, a gone client's request is not scored."""

from __future__ import annotations

import asyncio

import pytest

from engagesim.serve.app import QueueBatcher


class Scorer:
    """A stand-in for the predictor: doubles each item, takes ``seconds`` a call, refuses negative items."""

    def __init__(self, seconds: float = 0.05):
        self.seconds, self.calls = seconds, []

    async def __call__(self, items: list[int]) -> list[int]:
        self.calls.append(list(items))
        await asyncio.sleep(self.seconds)
        if any(i < 0 for i in items):
            raise ValueError("negative")
        return [2 * i for i in items]


def test_an_idle_scorer_takes_a_request_at_once_and_what_queues_meanwhile_is_one_batch():
    async def main():
        scorer = Scorer()
        batcher = QueueBatcher(scorer, max_size=32)
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.01)  # the first call is running
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(2, 11)]
        return await first, await asyncio.gather(*rest), scorer.calls

    first, rest, calls = asyncio.run(main())
    assert first == 2 and rest == [2 * i for i in range(2, 11)]
    assert calls == [[1], list(range(2, 11))]  # one call for the nine that queued, not nine


def test_batches_hold_at_most_max_size():
    async def main():
        scorer = Scorer(0.02)
        batcher = QueueBatcher(scorer, max_size=4)
        out = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
        return out, scorer.calls

    out, calls = asyncio.run(main())
    assert out == [2 * i for i in range(10)]
    assert [len(c) for c in calls] == [4, 4, 2] and sum(calls, []) == list(range(10))


def test_a_bad_request_fails_alone_not_the_batch_it_queued_in():
    async def main():
        batcher = QueueBatcher(Scorer(0.01), max_size=32)
        blocker = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.002)
        results = await asyncio.gather(*(batcher.submit(i) for i in (1, -1, 2)), return_exceptions=True)
        await blocker
        return results

    good, bad, other = asyncio.run(main())
    assert (good, other) == (2, 4)
    assert isinstance(bad, ValueError)


def test_a_request_whose_client_is_gone_is_not_scored():
    async def main():
        scorer = Scorer(0.03)
        batcher = QueueBatcher(scorer)
        blocker = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.005)
        gone, kept = asyncio.create_task(batcher.submit(7)), asyncio.create_task(batcher.submit(8))
        await asyncio.sleep(0.005)
        gone.cancel()  # e.g. the gateway's deadline passed
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await blocker, await kept, scorer.calls

    first, kept, calls = asyncio.run(main())
    assert (first, kept) == (2, 16) and calls == [[1], [8]]
