"""The Hugging Face formats: `config.json` <-> `ModelConfig` and tensor names/layouts both ways
(`layouts`), safetensors shards and their index (`shards`). Export writes through it, inference
reads through it; it imports nothing of Ava's but `config`."""
