"""Running the analyses over data: the run store (`results`), the streaming loop
(`streaming`), the run context every dataset-level run starts with (`context`), the model
and data specs parsed once (`specs`) and what builds models and datasets from them
(`sources`), and one module per dataset-level run (`identify`, `perturb`, `explain`,
`decompose`). See docs/architecture.md.
"""
