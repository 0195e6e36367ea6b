"""Data side of recscale: raw formats, `prepare`/`encode`/`synth`, the spec, and the streaming DataModule
(`recscale.data.datamodule.CTRDataModule`)."""
