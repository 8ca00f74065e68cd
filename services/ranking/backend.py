"""What serves a validated query: the micro-batched backend (the naive baseline is in :mod:`.naive`).

Both backends own a model slot and its hot-reload watcher (:class:`ModelOwner`); they differ in
how a call reaches the model. :class:`BatchedBackend` hands calls to the
:class:`~services.ranking.batcher.MicroBatcher`, whose batches
:class:`~services.ranking.engine.BatchEngine` computes with one Redis pipeline and one forward
pass each: int8 model, load-adaptive paths.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from services.ranking.batcher import MicroBatcher
from services.ranking.config import RankingConfig
from services.ranking.engine import BatchEngine, item_stats_of
from services.ranking.errors import NoModel, Overloaded
from services.ranking.experiments import ExperimentWatcher
from services.ranking.features import FeatureFetcher
from services.ranking.impressions import ImpressionPublisher, kafka_producer_factory
from services.ranking.lifecycle import ModelSlot, ModelWatcher
from services.ranking.looplag import LoopLag
from services.ranking.metrics import RankingMetrics
from services.ranking.validation import Query

log = logging.getLogger(__name__)


def _load_warm(version_dir: Path, *, device: str, quantized: bool, dense_runtime: str | None) -> Any:
    from models.artifacts import load_version

    ranker = load_version(version_dir, device=device, quantized=quantized, dense_runtime=dense_runtime)
    ranker.warmup()
    return ranker


def _torch_threads(n: int) -> None:
    """torch's thread count for the calling thread too: OpenMP keeps it per thread, and a worker
    left at the default would start a team per kernel on every core."""
    import torch

    torch.set_num_threads(n)


def _experiment_watcher(
    config: RankingConfig, metrics: RankingMetrics, slot: ModelSlot, load: Callable[[Path], Any]
) -> ExperimentWatcher | None:
    if not config.experiments:
        return None
    from models.artifacts import list_versions
    from recstack.redis_url import connect

    return ExperimentWatcher(
        partial(connect, config.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0),
        Path(config.models_dir),
        slot,
        load=load,
        list_versions=list_versions,
        interval_s=config.experiment_poll_interval_s,
        metrics=metrics,
    )


def _impression_publisher(config: RankingConfig, metrics: RankingMetrics) -> ImpressionPublisher | None:
    if not config.kafka_bootstrap or not config.impressions_topic:
        return None
    return ImpressionPublisher(
        kafka_producer_factory(
            config.kafka_bootstrap,
            config.kafka_security,
            config.impressions_linger_ms,
            max_buffer=config.impressions_buffer,
        ),
        config.impressions_topic,
        max_buffer=config.impressions_buffer,
        linger_ms=config.impressions_linger_ms,
        metrics=metrics,
    )


class ModelOwner:
    """The model slot and watcher both backends share."""

    def __init__(self, config: RankingConfig, metrics: RankingMetrics, quantized: bool) -> None:
        from models.artifacts import list_versions, read_default

        self.config = config
        self.metrics = metrics
        self.models = ModelSlot()
        # Loading and warming a version is slow; its own thread keeps it off the batch workers.
        self._load_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-load")
        # Every version served (default or experiment arm) goes through these same checks.
        self.load_version = partial(
            _load_warm,
            device=config.device,
            quantized=quantized,
            dense_runtime=config.dense_runtime if quantized else None,
        )
        self.watcher = ModelWatcher(
            Path(config.models_dir),
            self.models,
            list_versions=list_versions,
            load=self.load_version,
            executor=self._load_pool,
            interval_s=config.model_poll_interval_s,
            metrics=metrics,
            read_pointer=read_default,
        )

    async def start_models(self, on_model: Callable[[Any], None] | None) -> None:
        import torch

        torch.set_num_threads(self.config.torch_threads)
        self.watcher.on_swap = on_model
        await self.watcher.check_now()  # serve at once when a valid version is already there
        if self.models.current is None:
            log.warning(
                "no valid model version in %s yet: answering UNAVAILABLE until one appears",
                self.config.models_dir,
            )
        self.watcher.start()

    async def stop_models(self) -> None:
        await self.watcher.stop()
        self._load_pool.shutdown(wait=False, cancel_futures=True)

    def require_model(self) -> None:
        if self.models.current is None:
            raise NoModel("no model version is loaded yet")


class BatchedBackend(ModelOwner):
    def __init__(self, config: RankingConfig, metrics: RankingMetrics, tracing: Any = None) -> None:
        """``tracing``: a :class:`~services.ranking.tracing.RankTracing`, or None (off)."""
        super().__init__(config, metrics, quantized=True)
        self.fetcher = FeatureFetcher(
            config.redis_url,
            timeout_s=config.redis_timeout_ms / 1000.0,
            item_refresh_s=config.item_refresh_ms / 1000.0,
            item_resync_s=config.item_resync_s,
            item_cache_max_items=config.item_cache_max_items,
            retry_interval_s=config.redis_retry_interval_s,
            metrics=metrics,
            item_transform=item_stats_of,
        )
        self.experiments = _experiment_watcher(config, metrics, self.models, self.load_version)
        self.impressions = _impression_publisher(config, metrics)
        self.engine = BatchEngine(
            self.fetcher,
            self.models,
            recommend_pool=config.recommend_pool,
            metrics=metrics,
            experiments=self.experiments,
            impressions=self.impressions,
            shadow_cpu_share=config.shadow_cpu_share,
            tracing=tracing,
        )
        self._max_lag_s = config.max_loop_lag_ms / 1000.0
        self._shed_min_calls = config.shed_min_queue
        self._in_flight = 0  # calls between serve() and their answer (event loop only)
        self.loop_lag = LoopLag(gauge=metrics.loop_lag, busy=lambda: self._in_flight > 0)
        self._workers = ThreadPoolExecutor(
            max_workers=config.max_concurrent_batches,
            thread_name_prefix="rank-batch",
            initializer=_torch_threads,
            initargs=(config.torch_threads,),
        )
        # The shadow's scoring runs on a thread of its own, so a call arriving meanwhile is
        # computed at once in a batch worker instead of waiting behind it.
        self._followups = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="rank-shadow",
            initializer=_torch_threads,
            initargs=(config.torch_threads,),
        )
        self.batcher: MicroBatcher[Query, Any] = MicroBatcher(
            self.engine,
            self._workers,
            max_batch_cost=config.max_batch_candidates,
            max_queue_delay_s=config.max_queue_delay_ms / 1000.0,
            max_queue=config.max_queue,
            max_queue_wait_s=config.max_queue_wait_ms / 1000.0,
            shed_min_queue=config.shed_min_queue,
            max_concurrent_batches=config.max_concurrent_batches,
            metrics=metrics,
            extra_load=self._lag_load if self._max_lag_s > 0 else None,
            inline_when_idle=config.inline_when_idle,
            tracing=tracing,
            followup_executor=self._followups,
        )
        self._recommend_cost = max(config.recommend_pool, 1)

    def _lag_load(self) -> float:
        # Half the limit is load 0.5 (the cascade head shrinks), 0.85 of it sends all to light;
        # like the refusal, only with a backlog (a stall alone says nothing about load).
        if self._in_flight < self._shed_min_calls:
            return 0.0
        return self.loop_lag.lag_s / self._max_lag_s

    async def start(self, on_model: Callable[[Any], None] | None = None) -> None:
        if self._max_lag_s > 0:
            self.loop_lag.start()
        self.fetcher.start()
        await self.batcher.start()

        def loaded(ranker: Any) -> None:
            # The new version's whole vocabulary into the item catalogue, in the background: the
            # first calls then read only their users.
            vocab = getattr(ranker, "vocab", None)
            if vocab is not None:
                self.fetcher.catalogue.preload(vocab.item_ids)
            if on_model is not None:
                on_model(ranker)

        await self.start_models(loaded)
        if self.impressions is not None:
            self.impressions.start()
        if self.experiments is not None:
            await self.experiments.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        await self.loop_lag.stop()
        if self.experiments is not None:
            await self.experiments.stop()
        if self.impressions is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.impressions.stop)
        await self.stop_models()
        await self.fetcher.stop()
        self._workers.shutdown(wait=True)
        self._followups.shutdown(wait=True)

    async def serve(self, query: Query, timeout_s: float | None) -> Any:
        self.require_model()
        lag = self.loop_lag.lag_s
        # Only with a backlog: a lone call after a stall (a model swap, a slow tick) is served late
        # rather than refused, as with wait-based shedding.
        if self._max_lag_s and lag > self._max_lag_s and self._in_flight >= self._shed_min_calls:
            self.metrics.shed.labels("loop_lag").inc()
            raise Overloaded(f"the server is {lag * 1000:.0f} ms behind its calls; retry later")
        cost = len(query.item_ids) if query.item_ids is not None else max(self._recommend_cost, query.top_k)
        self._in_flight += 1
        self.loop_lag.wake()
        try:
            return await self.batcher.submit(query, cost, timeout_s)
        finally:
            self._in_flight -= 1
