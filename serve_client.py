"""A streaming terminal client for the service: type a prompt, watch the tokens arrive, see TTFT and tok/s.

    python serve_client.py                              # interactive, completions, http://127.0.0.1:8000
    python serve_client.py --chat                       # interactive chat (keeps the conversation)
    python serve_client.py "import os" --max-tokens 64  # one prompt, then exit

TTFT is measured from sending the request to the first token's event; tok/s counts tokens after the first
over the time after the first (decode speed), with the token count taken from the server's ``usage``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.text import Text


@dataclass
class Stats:
    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    end: float | None = None
    events: int = 0
    tokens: int | None = None  # from usage, at the end
    finish_reason: str | None = None

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first is None else 1000 * (self.first - self.start)

    def tok_per_s(self) -> float | None:
        n = self.tokens if self.tokens is not None else self.events
        now = self.end or time.perf_counter()
        if self.first is None or n < 2 or now <= self.first:
            return None
        return (n - 1) / (now - self.first)

    def line(self) -> Text:
        ttft = f"{self.ttft_ms:.0f} ms" if self.ttft_ms is not None else "…"
        rate = self.tok_per_s()
        n = self.tokens if self.tokens is not None else self.events
        parts = [f"TTFT {ttft}", f"{n} tokens", f"{rate:.1f} tok/s" if rate else "… tok/s"]
        if self.finish_reason:
            parts.append(f"finish: {self.finish_reason}")
        return Text("  ·  ".join(parts), style="dim")


def stream(client: httpx.Client, console: Console, path: str, body: dict, prompt: str) -> tuple[str, Stats]:
    stats = Stats()
    out = Text()
    view = lambda: Group(Panel(Text.assemble(Text(prompt, style="bold"), out), border_style="cyan"),  # noqa: E731
                         stats.line())
    with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            err = json.loads(r.read()).get("error", {})
            retry = r.headers.get("retry-after")
            console.print(f"[red]HTTP {r.status_code}[/red] {err.get('message', '')}"
                          + (f" (retry after {retry} s)" if retry else ""))
            return "", stats
        with Live(view(), console=console, auto_refresh=False) as live:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:  # the stream failed after it started (e.g. its worker died)
                    console.print(f"[red]{event['error']['message']}[/red]")
                    break
                if event.get("usage"):
                    stats.tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    delta = choice.get("delta", {})
                    if "role" in delta:  # a chat stream opens with the role: no token yet
                        continue
                    stats.first = stats.first or time.perf_counter()
                    stats.events += 1
                    piece = choice["text"] if "text" in choice else delta.get("content")
                    if piece:
                        out.append(piece, style="green")
                    stats.finish_reason = choice.get("finish_reason") or stats.finish_reason
                live.update(view(), refresh=True)
            stats.end = time.perf_counter()
            live.update(view(), refresh=True)
    if not console.is_terminal:
        console.line()  # Live cannot redraw in place here and leaves the cursor after its last line
    return out.plain, stats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt", nargs="?", help="one prompt to run; without it, read prompts interactively")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="defaults to the first model the service lists")
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions and keep the conversation")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--priority", type=int, default=0, help="lower is served first (scheduling_policy: priority)")
    p.add_argument("--api-key", default=os.environ.get("GPT2SERVE_API_KEY"),
                   help="for a service with api_keys (default: $GPT2SERVE_API_KEY)")
    args = p.parse_args(argv)

    console = Console()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, timeout=httpx.Timeout(600, connect=10), headers=headers) as client:
        try:
            model = args.model or client.get("/v1/models").json()["data"][0]["id"]
        except httpx.HTTPError as e:
            console.print(f"[red]cannot reach {args.url}: {e}[/red]")
            sys.exit(1)
        console.print(f"[dim]{args.url} · model {model} · {'chat' if args.chat else 'completions'} · "
                      "empty line or Ctrl-D to quit[/dim]")
        history: list[dict] = []
        while True:
            if args.prompt is None:
                try:
                    prompt = console.input("[bold cyan]> [/bold cyan]") if sys.stdin.isatty() else input()
                except (EOFError, KeyboardInterrupt):
                    break
                if not prompt.strip():
                    break
            else:
                prompt = args.prompt
            body = {"model": model, "max_tokens": args.max_tokens, "temperature": args.temperature,
                    "top_p": args.top_p, "top_k": args.top_k, "priority": args.priority, "stream": True,
                    "stream_options": {"include_usage": True}}
            if args.seed is not None:
                body["seed"] = args.seed
            if args.chat:
                history.append({"role": "user", "content": prompt})
                answer, _ = stream(client, console, "/v1/chat/completions", {**body, "messages": history}, "")
                history.append({"role": "assistant", "content": answer})
            else:
                stream(client, console, "/v1/completions", {**body, "prompt": prompt}, prompt)
            if args.prompt is not None:
                break


if __name__ == "__main__":
    main()
