"""Data: text sources, the sentencepiece tokenizer and packed grain input pipelines."""
