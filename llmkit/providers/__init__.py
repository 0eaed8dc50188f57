"""Provider adapters, one module per wire format, behind ``base.Adapter``."""
