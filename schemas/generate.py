"""Regenerate ``schemas/json``: ``python -m schemas.generate``."""

from __future__ import annotations

from pathlib import Path

from schemas.codec import render_json_schemas

JSON_DIR = Path(__file__).parent / "json"


def main() -> None:
    JSON_DIR.mkdir(exist_ok=True)
    for name, text in render_json_schemas().items():
        (JSON_DIR / name).write_text(text)


if __name__ == "__main__":
    main()
