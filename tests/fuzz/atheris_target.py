"""A coverage-guided (atheris/libFuzzer) run of one fuzz property, started by tests/fuzz/run.py.

    python tests/fuzz/atheris_target.py events|requests CORPUS_DIR [libFuzzer flags...]

``events``: the event validator's property (tests/unit/test_fuzz_events.py ``check_value``) on
each input as one Kafka value, and on the input split at newlines as one poll's batch.
``requests``: the ranking server's deserializer and validation
(tests/unit/test_fuzz_ranking_requests.py) on each input as a Rank and as a Recommend body.
A failed property raises, which libFuzzer reports as a crash and saves the input.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS / "unit"), str(TESTS.parent)]

with atheris.instrument_imports():
    import recstack.events  # noqa: F401  (instrumented: coverage guides the fuzzer through it)
    import services.ranking.validation  # noqa: F401

import test_fuzz_events  # noqa: E402
import test_fuzz_ranking_requests  # noqa: E402


def events(data: bytes) -> None:
    test_fuzz_events.check_value(data)
    if b"\n" in data:
        test_fuzz_events.check_batch(data.split(b"\n"))


def requests(data: bytes) -> None:
    test_fuzz_ranking_requests.check_rank_body(data)
    test_fuzz_ranking_requests.check_recommend_body(data)


def main() -> None:
    target = {"events": events, "requests": requests}[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
