"""The HTTP layer: OpenAI-compatible routes over the AsyncEngine. No model logic lives here."""
