"""When tracing is on, and where its spans go: the rule and the exporter come from OTEL_* alone."""

from __future__ import annotations

import pytest

from services.ranking.config import tracing_wanted


@pytest.mark.parametrize(
    ("flag", "env", "on"),
    [
        (False, {}, False),  # off by default
        (True, {}, True),  # --tracing / RECSTACK_TRACING=true
        (False, {"OTEL_SDK_DISABLED": "false"}, True),
        (False, {"OTEL_TRACES_EXPORTER": "otlp"}, True),
        (False, {"OTEL_TRACES_EXPORTER": "console"}, True),
        (True, {"OTEL_SDK_DISABLED": "true"}, False),  # the standard kill switch wins
        (True, {"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "otlp"}, False),
        (True, {"OTEL_TRACES_EXPORTER": "none"}, False),
        (False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, False),  # where, not whether
    ],
)
def test_the_rule_for_turning_tracing_on(flag, env, on) -> None:
    assert tracing_wanted(flag, env) is on


def test_the_exporter_follows_the_standard_variables(monkeypatch) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    from services.ranking.tracing import _exporter_from_env

    assert isinstance(_exporter_from_env({}), GrpcExporter)
    assert isinstance(_exporter_from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}), GrpcExporter)
    assert isinstance(_exporter_from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}), HttpExporter)
    # the traces-specific variable wins over the general one
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
    assert isinstance(_exporter_from_env(env), HttpExporter)
    assert isinstance(_exporter_from_env({"OTEL_TRACES_EXPORTER": "console"}), ConsoleSpanExporter)
    with pytest.raises(ValueError, match="OTEL_EXPORTER_OTLP_PROTOCOL.*http/json"):
        _exporter_from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER.*zipkin"):
        _exporter_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})


def test_the_service_name_defaults_to_recstack_ranking_unless_otel_names_it(monkeypatch) -> None:
    from services.ranking.tracing import RankTracing

    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    env = {"OTEL_TRACES_EXPORTER": "console"}
    tracing = RankTracing.from_env(env)
    assert tracing.provider.resource.attributes["service.name"] == "recstack-ranking"
    tracing.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "ranking-eu-1")
    tracing = RankTracing.from_env(env)
    assert tracing.provider.resource.attributes["service.name"] == "ranking-eu-1"
    tracing.shutdown()
