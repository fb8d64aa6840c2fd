from bridge.native import sources_requested, use_sources

if sources_requested():  # AZIZA_PURE_PYTHON=1: the media path's sources, not its compiled modules
    use_sources()
