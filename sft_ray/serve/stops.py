"""A request's stop strings: the one place that says where an answer's text ends and which streamed text must
wait. The non-streaming path, the stream and the engine's final cut all ask here, so they cannot disagree."""

from __future__ import annotations


class StopStrings:
    """The non-empty stop strings of one request (OpenAI's ``stop``: a string or a list of them)."""

    def __init__(self, stop: str | tuple[str, ...] | list[str] | None):
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        self.stops = tuple(s for s in stops if s)

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find(self, text: str) -> int:
        """Where the answer ends: the earliest place any stop string begins in ``text``, or -1."""
        return min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)

    def may_begin(self, text: str) -> bool:
        """``text`` ends with the beginning of a stop string: a stream holds such text back until the next piece
        shows whether the stop string follows (it is never sent when it does)."""
        return any(text.endswith(s[:k]) for s in self.stops for k in range(1, len(s)))
