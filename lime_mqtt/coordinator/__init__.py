"""The coordinator: request intake, generation, KV admission, text streaming."""
