"""Tessera's server: HTTP API, engine, scheduler, KV and module pools, model runner, backbones, CLI."""
