"""`python -m train --config=configs/<name>.py`: continued pretraining with DGA."""
