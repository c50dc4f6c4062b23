"""The embedding cache's flags and wrapping, shared by `embforge mine` and `embforge eval` (engine/cache.py)."""
from __future__ import annotations

import sys


def cache_flags(p) -> None:
    p.add_argument("--no-cache", action="store_true",
                   help="do not read or write the embedding cache (embforge models are cached by weights + text)")
    p.add_argument("--cache-dir", default=None, help="embedding cache root (default: $EMBFORGE_CACHE/embeddings)")


def with_cache(encoder, args):
    """An embforge model behind the embedding cache; other encoders as they are."""
    from embforge.engine.cache import maybe_cached
    return maybe_cached(encoder, enabled=not args.no_cache, root=args.cache_dir)


def report_cache(encoder):
    from embforge.engine.cache import CachedEncoder
    if isinstance(encoder, CachedEncoder):
        print(f"embedding cache {encoder.cache.dir}: {encoder.reused} texts reused, {encoder.encoded} encoded",
              file=sys.stderr)
