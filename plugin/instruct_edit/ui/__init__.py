"""Widgets: thin views of model.state bound to the controller."""
