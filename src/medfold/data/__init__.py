"""Stage 1, data: images decoded (files, DICOM, MedMNIST arrays), fingerprinted and matched for copies,
indexed into one validated table (index), cached at the training size; the demo's data is made here."""
