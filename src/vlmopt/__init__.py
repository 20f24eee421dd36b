"""vlmopt: Hugging Face vision-language models to verified, fast deployment artifacts."""

__version__ = "0.1.0"
