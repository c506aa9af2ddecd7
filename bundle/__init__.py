"""The shared contract: bundle and release types, canonical encoding, the DSSE
envelope and the decision engine. It imports no stage (compiler, runtime, reconciler)."""
