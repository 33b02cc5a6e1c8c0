"""Unity Catalog grants: which privileges an identity holds on the securables a call touches."""
