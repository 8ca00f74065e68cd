"""Request validation and configuration checks of the ranking service."""

from __future__ import annotations

import pytest

from recstack.v1 import ranking_pb2
from services.ranking.config import RankingConfig, read_auth_token
from services.ranking.errors import InvalidArgument
from services.ranking.validation import validate_rank, validate_recommend


def _field(exc: pytest.ExceptionInfo) -> str:
    return exc.value.field


def test_valid_rank_becomes_a_query():
    q = validate_rank(ranking_pb2.RankRequest(user_id="u1", item_ids=["a", "b"], top_k=1), 1000)
    assert (q.user_id, q.item_ids, q.top_k, q.include_purchased) == ("u1", ["a", "b"], 1, False)


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"user_id": "", "item_ids": ["a"]}, "user_id"),
        ({"user_id": "u" * 129, "item_ids": ["a"]}, "user_id"),
        ({"user_id": "u", "item_ids": []}, "item_ids"),
        ({"user_id": "u", "item_ids": ["a"] * 1001}, "item_ids"),
        ({"user_id": "u", "item_ids": ["a", ""]}, "item_ids[1]"),
        ({"user_id": "u", "item_ids": ["a", "b", "x" * 129]}, "item_ids[2]"),
        ({"user_id": "u", "item_ids": ["a"], "top_k": -1}, "top_k"),
    ],
)
def test_invalid_rank_names_the_field(request_kwargs, field):
    with pytest.raises(InvalidArgument) as exc:
        validate_rank(ranking_pb2.RankRequest(**request_kwargs), 1000)
    assert _field(exc) == field
    assert str(exc.value).startswith(field + ":")


def test_id_length_limit_is_inclusive():
    validate_rank(ranking_pb2.RankRequest(user_id="u" * 128, item_ids=["i" * 128] * 1000), 1000)


def test_recommend_defaults_and_limits():
    q = validate_recommend(ranking_pb2.RecommendRequest(user_id="u"), max_k=1000, default_k=10)
    assert (q.item_ids, q.top_k, q.include_purchased) == (None, 10, False)
    q = validate_recommend(ranking_pb2.RecommendRequest(user_id="u", k=3, include_purchased=True), 1000, 10)
    assert (q.top_k, q.include_purchased) == (3, True)
    for kwargs, field in (
        ({"user_id": "u", "k": -1}, "k"),
        ({"user_id": "u", "k": 1001}, "k"),
        ({"user_id": "", "k": 1}, "user_id"),
    ):
        with pytest.raises(InvalidArgument) as exc:
            validate_recommend(ranking_pb2.RecommendRequest(**kwargs), 1000, 10)
        assert _field(exc) == field


def test_config_defaults_follow_the_contract():
    c = RankingConfig()
    # The contract's ports; the address is loopback unless a host is given (issue 14, safe defaults).
    assert (c.host, c.port, c.metrics_port, c.redis_url) == (
        "127.0.0.1",
        50051,
        9464,
        "redis://127.0.0.1:6379/0",
    )
    assert str(c.models_dir) == "artifacts/models"
    assert c.max_candidates == 1000


def test_config_refuses_bad_values_with_every_problem():
    with pytest.raises(ValueError) as exc:
        RankingConfig(port=70000, max_queue=0, max_batch_candidates=10, redis_timeout_ms=-1)
    text = str(exc.value)
    for part in ("port 70000", "max_queue", "max_batch_candidates", "redis_timeout_ms"):
        assert part in text
    with pytest.raises(ValueError, match="both a certificate and a key"):
        RankingConfig(tls_cert="cert.pem")  # type: ignore[arg-type]


def test_auth_token_never_in_repr_and_read_from_file_or_env(tmp_path, monkeypatch):
    c = RankingConfig(auth_token="s3cret")
    assert "s3cret" not in repr(c)
    token_file = tmp_path / "token"
    token_file.write_text("  from-file\n")
    monkeypatch.setenv("RECSTACK_AUTH_TOKEN", "from-env")
    assert read_auth_token(token_file) == "from-file"
    assert read_auth_token(None) == "from-env"
    monkeypatch.delenv("RECSTACK_AUTH_TOKEN")
    assert read_auth_token(None) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_auth_token(tmp_path / "empty")
