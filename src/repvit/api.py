def create_model(*a, **k): pass
def load_checkpoint(*a, **k): pass
def save_checkpoint(*a, **k): pass
