"""The offline corpus job (Ray Data): the service's exact vectors for a whole corpus, resumable."""
