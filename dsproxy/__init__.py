"""dsproxy: prepaid LLM access, settled on Solana, recorded on the DePHY Nostr network."""
