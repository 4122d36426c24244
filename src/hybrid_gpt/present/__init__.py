"""The presentation layer: markdown tables, sentences and plots, rendered from the data that measuring code
returns (dicts that serialise to the committed JSON). Torch-free and low in the flow, so that every stage can
write its own report files without measuring code ever formatting text."""
