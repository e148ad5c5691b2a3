"""The LLM judge: pure prompt building and reply parsing, and a thin async client."""
