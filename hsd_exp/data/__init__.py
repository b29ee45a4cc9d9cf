"""Data: dataset loaders (Hub or local files), the original-release readers, prompt formats, the datamodule."""
