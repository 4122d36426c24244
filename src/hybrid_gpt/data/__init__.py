"""Data, the first step of the flow: corpus -> tokenizer -> token files, and the chat data for SFT and DPO."""
