"""Admission: a session request checked and settled (caps, its address's count, language, site, vocabulary) before
any session exists, and the same checks for what a client changes later."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from .api import EngineBusy, InvalidSite, SessionRequest, UnsupportedLanguage
from .config import AUTO_LANGUAGE, SITE_PATTERN, Settings
from .endpointing import EndpointRules
from .events import quoted
from .metrics import Metrics
from .vocabulary import NamesFile, NameSpeller, Vocabulary, names_prompt

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodingNames:
    """A vocabulary as decoding uses it: the prompt sentence naming what fits, and the speller of all its names."""

    vocabulary: Vocabulary
    prompt: str = ""
    speller: NameSpeller | None = None


@dataclass(frozen=True)
class Admitted:
    """A request the engine took, settled: the model's language code, the checked site, the merged names and, for a
    request whose command the service ends, the endpoint rules at its sensitivity."""

    request: SessionRequest
    language: str
    site: str
    names: DecodingNames
    endpoint_rules: EndpointRules | None = None


class Admission:
    """Decides whether a session may open and on what terms; counts the open sessions of each client address."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        languages: Callable[[], tuple[str, ...]],
        common_words: Callable[[], frozenset[str]],
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._languages = languages
        self._common_words = common_words
        self._names_file = NamesFile(settings.model.vocabulary_file) if settings.model.vocabulary_file else None
        self._external_names: dict[str, tuple[str, ...]] = {}
        # Open sessions per client address, for limits.max_sessions_per_address.
        self._peers: dict[str, int] = {}

    def admit(self, request: SessionRequest, open_sessions: int) -> Admitted:
        """The request's settled terms, its address counted; raises EngineBusy (`limits.max_sessions` open, or its
        address holds `limits.max_sessions_per_address`), UnsupportedLanguage or InvalidSite."""
        limits = self._settings.limits
        if open_sessions >= limits.max_sessions:
            self._metrics.rejected_total.labels("busy").inc()
            raise EngineBusy(f"all {limits.max_sessions} sessions are in use")
        peer = request.peer
        if peer is not None and self._peers.get(peer, 0) >= limits.max_sessions_per_address:
            self._metrics.rejected_total.labels("busy").inc()
            raise EngineBusy(f"this address already has {limits.max_sessions_per_address} sessions")
        admitted = Admitted(
            request,
            self.language(request.language or self._settings.model.language),
            self.site(request.site or self._settings.sites.default),
            self.names(request.names, request.terms),
            EndpointRules.of(self._settings.endpointing, request.vad_sensitivity) if request.endpointing else None,
        )
        if peer is not None:
            self._peers[peer] = self._peers.get(peer, 0) + 1
        return admitted

    def release(self, admitted: Admitted) -> None:
        """A session admitted on these terms has closed: its address may open another."""
        peer = admitted.request.peer
        if peer is None:
            return
        self._peers[peer] -= 1
        if not self._peers[peer]:
            del self._peers[peer]

    def language(self, language: str) -> str:
        """The model's code for a language tag (`en-US` → `en`), or AUTO_LANGUAGE for a model of several languages
        (a model of one speaks only it); raises UnsupportedLanguage."""
        code = language.strip().lower().replace("_", "-").split("-")[0]
        languages = self._languages()
        if code == AUTO_LANGUAGE and languages:
            return code if len(languages) > 1 else languages[0]
        if code not in languages:
            known = ", ".join(languages) if len(languages) <= 10 else f"{len(languages)} languages"
            raise UnsupportedLanguage(f"language {language!r} is not one the model knows ({known})")
        return code

    def site(self, site: str) -> str:
        """The site if clients may name it (1 to 64 letters, digits, '_' or '-'; one of `sites.allowed` when
        listed): sites become MQTT topics and Home Assistant entities. Raises InvalidSite."""
        if not SITE_PATTERN.fullmatch(site):
            raise InvalidSite(f"site {quoted(site)} must be 1 to 64 letters, digits, '_' or '-'")
        allowed = self._settings.sites.allowed
        if allowed and site not in allowed:
            raise InvalidSite(f"site {quoted(site)} is not one of sites.allowed")
        return site

    def names(self, names: tuple[str, ...], terms: tuple[str, ...]) -> DecodingNames:
        """A request's names and terms, then the configured vocabulary and its file, then outside sources'
        (Home Assistant's), in the priority in which they take the prompt's room; with the prompt sentence naming
        what fits in `stream.names_chars` and the speller of all the names."""
        from_file = self._names_file.names if self._names_file is not None else ()
        vocabulary = Vocabulary.merge(
            names, terms, self._settings.model.vocabulary, from_file, *self._external_names.values()
        )
        if not vocabulary.names:
            return DecodingNames(vocabulary)
        prompt, left_out = names_prompt(vocabulary.names, self._settings.stream.names_chars)
        if left_out:
            _LOGGER.info(
                "%d of %d names did not fit in the decoder prompt (stream.names_chars)", left_out, len(vocabulary.names)
            )
        return DecodingNames(vocabulary, prompt, NameSpeller(vocabulary.names, self._common_words()))

    def set_names(self, source: str, names: tuple[str, ...]) -> None:
        """The household's names from a source outside the config (e.g. "homeassistant"), for new sessions."""
        self._external_names[source] = names
