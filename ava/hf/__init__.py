"""The Hugging Face formats: `config.json` <-> `ModelConfig` and tensor names/layouts both ways —
Ava's own layout and Mixtral's (`layouts`), one module per Llama-style family (`olmoe`,
`qwen2_moe`, `qwen3_moe`, `llama`, `qwen2`, `qwen3`, registered in `families`, sharing `family`)
— and safetensors shards and their index (`shards`). Export writes through it, inference reads
through it; it imports nothing of Ava's but `config`."""
