"""`edge-asr bench CORPUS`: replay WAV + TXT pairs like live speakers and report accuracy, latency, CPU and RSS.

Each clip (16 kHz mono s16le `.wav` beside its reference `.txt`; an empty `.txt` means no speech) is
sent in 20 ms chunks, paced against an absolute schedule (chunk k leaves when its audio has been
"spoken": at start + bytes sent including that chunk / 32000, so a slow send never accumulates drift;
`--fast` sends without pacing), followed by `--trailing-silence` seconds of digital silence and the end
signal, through the engine in-process, a running server (`--url ws://HOST:PORT/ws/stream`) or any Wyoming
speech-to-text server (`--wyoming tcp://HOST:PORT`). `--runs N` replays the whole corpus N times, one run after
the other, each with a fresh engine (in-process) or fresh connections.

`--vocabulary FILE`: the household's names, one a line (blank lines and `#` comments skipped, each name once,
at most what a request may carry: 200 names of 100 characters). Every request of the streaming run carries
them: in-process as the session's `names`, on the WebSocket as `{"type": "config", "vocabulary": [...]}` right
after `ready` and before the audio, on Wyoming as `transcribe`'s `transcript_names`.

The offline row (on by default, `--no-offline` skips it; `--offline` is still accepted): each clip decoded
whole, once, by the same model with the local settings (also with `--url`/`--wyoming`), padded to 30 s, with
no prompt but the names' (the service's own `names_prompt` within `stream.names_chars`, used as its finals use
it, each word then spelled by its `NameSpeller`): what a non-streaming server would give, to tell streaming
losses from model errors.

How the numbers are measured (all times from `time.monotonic()` in this process):

- WER: word errors (substitutions + deletions + insertions of jiwer's word alignment) / reference words
  over the whole corpus, after normalising both sides with Whisper's English normaliser.
  Words a no-speech clip produced count as insertions; such clips are also counted as hallucinations.
- Names right (`names 34/48`, with `--vocabulary`): for each name, its occurrences in the clip's reference
  and how many of them the final text has (case-insensitive whole words after dropping a possessive 's, a
  name of several words as a phrase, occurrences not overlapping); the share is the sum over names and clips
  of min(found, expected) / the sum of expected. n/a without a vocabulary or when no reference holds a name.
  The JSON has `names_found` and `names_expected` per clip and summed, and `names_right`.
- Error classes, per clip and summed, from the same alignment: `ins after` (inserted_after_speech) counts
  hypothesis words inserted after the last reference word the alignment matched or substituted (every word
  of a no-speech clip); `lost 1st 2` (lost_first_two) counts reference words among the first two that the
  alignment deleted (0 to 2 per clip, 2 when nothing was recognised); `no final` counts clips whose reference
  has words but that got no final with text (offline: no text from the whole-clip decode).
- `revised`: finals whose `revised` flag says they changed words the partials had shown as stable
  (n/a for Wyoming, whose events carry no such flag).
- A position in a clip is "spoken" when the chunk holding it was handed to the transport.
- Word lag: the clip's final words are assumed evenly spread between the speech start and the last
  voiced frame that `VadGate` (with the local stream settings) finds in the clip: word i of N ends at
  start + (i+1)/N * (end - start). Its lag is the first time any partial (or the final) had that
  normalised word at that position, minus when that word end was spoken. It is an estimate: a lag may
  be negative when a word is shorter than the even share.
- First partial: speech start (as above) to the first partial (or the final, when no partial came first).
- End -> final: sending the end signal to receiving the clip's last final; 0 when it came before the end
  (the server's VAD already closed the utterance in the trailing silence). Clips without a final are left out.
- ttct and e2e: the server's own `ttct_ms` and `e2e_ms` fields (n/a for Wyoming, whose events carry none).
- CPU-seconds per audio-second: CPU time (user + system) of the measured process during the replay,
  divided by the seconds of corpus audio (trailing silence not included). In-process that process is
  this one (engine and bench client together); with `--url` or `--wyoming` it is `--pid`, else not measured.
  Peak RSS is sampled every 100 ms. Idle CPU is measured over 3 s with no session after the replay.
  Start -> ready (in-process) is the engine's start, model load included. All of these are per run.
- Several runs: a row per run, then a `median` row with the median of each numeric column across the runs
  that measured it (WER is the median of the per-run WERs), and the share of clips whose final text,
  normalised as scored, is the same in every run. The JSON report has `runs` (each run's `streaming`,
  `resources` and `clips`), `median` and `stability` (`share`, `differing_clips`); its top-level
  `streaming`, `resources` and `clips` are the first run's. The exit code is 1 when any clip of any run got
  an error.

WebSocket end of a clip: after `{"type":"end"}` the bench reads until the server's `done` (sent once
everything before the end is transcribed, after the final if there is one). A server that closes first,
or sends no `done` within 10 s of the end, gives the clip an error, as does a message that is not JSON or
not a well-formed server message (`bad_message`).

Wyoming, as a satellite speaks it: per clip one connection with `transcribe`, `audio-start`, the chunks as
`audio-chunk`s and `audio-stop` as the end signal; then the bench reads until `transcript-stop`, or until
`transcript` (or `error`) from a server that sent no `transcript-start` (one that does not stream, such as
wyoming-faster-whisper). None within 30 s of `audio-stop` gives the clip an error. The `transcript-chunk`s
add up to the text so far and count as partials (word lag; first partial is the first transcript-chunk, or
the transcript when none came first); `transcript` is the final, so end -> final is audio-stop -> transcript.
"""
