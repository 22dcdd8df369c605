"""Admission settles a request (caps, its address's count, language, site, names) before any session exists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge_asr.admission import Admission
from edge_asr.api import EngineBusy, InvalidSite, SessionRequest, UnsupportedLanguage
from edge_asr.config import build_settings
from edge_asr.metrics import Metrics

pytestmark = pytest.mark.fast


def admission(**sections: Any) -> tuple[Admission, Metrics]:
    """An admission over `sections` of settings, for a model that speaks English and German."""
    metrics = Metrics()
    return Admission(build_settings(sections), metrics, lambda: ("en", "de"), lambda: frozenset({"the"})), metrics


def busy_refusals(metrics: Metrics) -> float:
    """How many sessions the metrics say were refused as busy."""
    value = metrics.registry.get_sample_value("edge_asr_sessions_rejected_total", {"reason": "busy"})
    return value or 0.0


def test_a_request_is_settled_on_the_configured_defaults() -> None:
    gate, _ = admission(model={"language": "de"}, sites={"default": "hall"})
    admitted = gate.admit(SessionRequest("test"), open_sessions=0)
    assert (admitted.language, admitted.site) == ("de", "hall")
    assert admitted.names.vocabulary.names == ()
    assert admitted.names.speller is None


def test_the_request_s_own_language_and_site_are_checked() -> None:
    gate, _ = admission(sites={"allowed": ["hall", "kitchen"], "default": "hall"})
    admitted = gate.admit(SessionRequest("test", language="EN_us", site="kitchen"), open_sessions=0)
    assert (admitted.language, admitted.site) == ("en", "kitchen")
    with pytest.raises(UnsupportedLanguage, match=r"^language 'fr' is not one the model knows \(en, de\)$"):
        gate.admit(SessionRequest("test", language="fr"), open_sessions=0)
    with pytest.raises(InvalidSite, match=r"is not one of sites\.allowed"):
        gate.admit(SessionRequest("test", site="attic"), open_sessions=0)
    with pytest.raises(InvalidSite, match=r"must be 1 to 64 letters"):
        gate.admit(SessionRequest("test", site="hall/1"), open_sessions=0)


def test_the_session_cap_refuses_before_anything_else_is_checked() -> None:
    gate, metrics = admission(limits={"max_sessions": 2})
    gate.admit(SessionRequest("test"), open_sessions=1)
    with pytest.raises(EngineBusy, match=r"^all 2 sessions are in use$"):
        gate.admit(SessionRequest("test", language="fr"), open_sessions=2)
    assert busy_refusals(metrics) == 1


def test_an_address_holds_at_most_its_share_until_a_session_is_released() -> None:
    gate, metrics = admission(limits={"max_sessions_per_address": 2})
    first = gate.admit(SessionRequest("test", peer="10.0.0.5"), open_sessions=0)
    gate.admit(SessionRequest("test", peer="10.0.0.5"), open_sessions=1)
    with pytest.raises(EngineBusy, match=r"^this address already has 2 sessions$"):
        gate.admit(SessionRequest("test", peer="10.0.0.5"), open_sessions=2)
    # Another address, and a client with no address, are not held back.
    gate.admit(SessionRequest("test", peer="10.0.0.6"), open_sessions=2)
    gate.admit(SessionRequest("test"), open_sessions=3)
    gate.release(first)
    gate.admit(SessionRequest("test", peer="10.0.0.5"), open_sessions=3)
    assert busy_refusals(metrics) == 1


def test_a_refused_request_takes_no_share_of_its_address() -> None:
    gate, _ = admission(limits={"max_sessions_per_address": 1})
    for _ in range(3):
        with pytest.raises(UnsupportedLanguage):
            gate.admit(SessionRequest("test", peer="10.0.0.5", language="fr"), open_sessions=0)
    gate.admit(SessionRequest("test", peer="10.0.0.5"), open_sessions=0)


def test_names_come_request_first_then_config_then_file_then_outside_sources(tmp_path: Path) -> None:
    names_file = tmp_path / "names.txt"
    names_file.write_text("Filed Name\n", encoding="utf-8")
    gate, _ = admission(model={"vocabulary": ["Configured"], "vocabulary_file": str(names_file)})
    gate.set_names("homeassistant", ("Outside", "configured"))
    admitted = gate.admit(SessionRequest("test", names=("Asked",), terms=("Term",)), open_sessions=0)
    names = admitted.names
    assert names.vocabulary.names == ("Asked", "Term", "Configured", "Filed Name", "Outside")
    assert all(name in names.prompt for name in names.vocabulary.names)
    assert names.speller is not None


def test_names_that_do_not_fit_the_prompt_still_reach_the_speller() -> None:
    gate, _ = admission(stream={"names_chars": 40})
    many = tuple(f"Name{index:02d}" for index in range(20))
    decoding = gate.names(many, ())
    assert decoding.vocabulary.names == many
    assert len(decoding.prompt) <= 40
    assert "Name19" not in decoding.prompt
    assert decoding.speller is not None
    assert decoding.speller.spell("name19") == "Name19"
