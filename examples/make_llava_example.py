"""Write examples/llava/corpus.json: examples/corpus.jsonl as a LLaVA / ShareGPT JSON array.

    python examples/make_llava_example.py

The layout is LLaVA's: one JSON array, records {"id", "image", "conversations": [{"from": "human" | "gpt", "value"}]},
image paths relative to a separate image folder (here examples/, given as --media-root). The text carries no <image>
placeholder, so each record is exactly its JSONL line's sample (a single image goes in front of the prompt) and scores
the same. The 3 bad JSONL lines become 3 bad records: a missing picture, a record that is not valid JSON (its brackets
balance, so only it is lost) and the unknown speaker "narrator".
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


def convert(line: str) -> str:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:  # the deliberately invalid line: an invalid record of the same id
        return '{"id": "bad-json", "conversations": [{"from": "human", "value": "Describe the image."} ' \
               '{"from": "gpt", "value": "A red circle."}]}'
    out = {"id": rec["id"]}
    if rec.get("images"):
        out["image"] = rec["images"][0] if len(rec["images"]) == 1 else rec["images"]
    out["conversations"] = [{"from": ROLE.get(m["role"], m["role"]), "value": m["content"]} for m in rec["messages"]]
    out |= {k: v for k, v in rec.items() if k not in ("id", "images", "messages")}
    return json.dumps(out, ensure_ascii=False)


def main() -> None:
    lines = (HERE / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    dst = HERE / "llava" / "corpus.json"
    dst.parent.mkdir(exist_ok=True)
    dst.write_text("[\n" + ",\n".join(convert(x) for x in lines) + "\n]\n", encoding="utf-8")
    print(f"{len(lines)} records -> {dst}")


if __name__ == "__main__":
    main()
