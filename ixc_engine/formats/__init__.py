"""Corpus formats: readers and writers of the forms people's data comes in, all yielding `Sample`s.

`source.open_corpus` picks the reader by extension and content: `records` (JSONL and the record shapes: native,
LLaVA / ShareGPT, OpenAI messages), `jsonarray` (a top-level JSON array, scanned record by record), `parquet`;
`parts` holds content parts and media references, `writers` the result files. The job file and the JSONL result
writer live in `ixc_engine/corpus.py`.
"""

# Names only (no imports): the CLI's parser reads them without importing torch.
FORMATS = ("jsonl", "json", "llava", "parquet")
