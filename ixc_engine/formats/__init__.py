"""Corpus formats: readers and writers of the forms people's data comes in, all yielding `Sample`s.

Today: `parts` (OpenAI / HF content parts and media references). The JSONL reader and the result writer live in
`ixc_engine/corpus.py`.
"""
