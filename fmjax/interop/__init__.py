"""Interop with other ecosystems' checkpoint and tokenizer formats (Hugging Face BERT)."""
