"""The method: skip policies (which layers run per generated token) and the engine that applies them
inside Hugging Face ``generate()``."""
